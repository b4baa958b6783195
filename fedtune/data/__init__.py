"""Federated data: a held-out test split plus one training partition per client.

:func:`build_federation` is the single entry point; the apps call it with the parsed
:class:`~fedtune.config.Config` and get the same :class:`Federation` in every process
(all shuffles come from :mod:`fedtune.rng`, partitioners are seeded from the run seed).
"""

from __future__ import annotations

from fedtune.data.text import (
    DataError,
    Federation,
    build_federation,
    load_table,
    partition,
    split_test,
)

__all__ = ["DataError", "Federation", "build_federation", "load_table", "partition", "split_test"]
