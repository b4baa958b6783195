"""Run config -> :class:`~fedtune.data.federation.Federation`: dispatch on the task.

The only module of :mod:`fedtune.data` that knows both tasks; imported by the package
``__init__`` and by nothing else inside ``fedtune/data`` (so text and chat stay independent).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from fedtune.data.chat import build_chat_federation
from fedtune.data.federation import Federation
from fedtune.data.text import build_text_federation

if TYPE_CHECKING:
    from fedtune.config import Config


def build_federation(cfg: Config) -> Federation:
    """The federation described by ``cfg`` (cached per process: Ray reuses its actors)."""
    return _build(
        cfg.task,
        cfg.dataset,
        cfg.data_path,
        cfg.text_column,
        cfg.label_column,
        cfg.client_column,
        cfg.partitioning,
        cfg.num_partitions,
        cfg.dirichlet_alpha,
        cfg.test_fraction,
        cfg.max_test_examples,
        cfg.max_examples_per_client,
        cfg.seed,
    )


@lru_cache(maxsize=4)
def _build(
    task: str,
    dataset: str,
    data_path: str,
    text_column: str,
    label_column: str,
    client_column: str,
    how: str,
    num_partitions: int,
    alpha: float,
    test_fraction: float,
    max_test: int,
    max_per_client: int,
    seed: int,
) -> Federation:
    if task == "causal-lm":
        return build_chat_federation(
            dataset,
            data_path,
            how,
            num_partitions,
            alpha,
            test_fraction,
            max_test,
            max_per_client,
            seed,
        )
    return build_text_federation(
        dataset,
        data_path,
        text_column,
        label_column,
        client_column,
        how,
        num_partitions,
        alpha,
        test_fraction,
        max_test,
        max_per_client,
        seed,
    )
