"""Federated data: a held-out test split plus one training partition per client.

:func:`build_federation` is the single entry point; the apps call it with the parsed
:class:`~fedtune.config.Config` and get the same :class:`Federation` in every process
(all shuffles come from :mod:`fedtune.rng`, partitioners are seeded from the run seed).

Layout (imports point downwards only): :mod:`~fedtune.data.federation` holds
``DataError``, ``Federation`` and the shared split / partition path;
:mod:`~fedtune.data.text` (classification) and :mod:`~fedtune.data.chat` (causal LM) load
their datasets and use it without importing each other; :mod:`~fedtune.data.build`
dispatches a run config to one of them.
"""

from __future__ import annotations

from fedtune.data.build import build_federation
from fedtune.data.federation import (
    DataError,
    Federation,
    partition,
    split_and_partition,
    split_test,
)
from fedtune.data.text import load_table

__all__ = [
    "DataError",
    "Federation",
    "build_federation",
    "load_table",
    "partition",
    "split_and_partition",
    "split_test",
]
