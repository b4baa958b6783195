"""What one training round did (:class:`RoundStats`) and its Flower metrics record."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flwr.app import MetricRecord

from fedtune.fl.records import metrics_record


@dataclass
class RoundStats:
    """What one training round did, for the progress line, the JSONL file and tests."""

    round: int
    sampled: int = 0
    valid: int = 0
    dropped: dict[str, str] = field(default_factory=dict)  # node id -> reason
    train_loss: float = math.nan
    num_examples: int = 0
    bytes_up: int = 0  # sum over replies of the reply's ArrayRecord bytes
    bytes_down: int = 0  # sum over sent messages of the ArrayRecord bytes
    skipped: bool = False
    update_norm: float = 0.0
    chains: int = 0  # train messages that carried a payload chain instead of the dense adapter
    privacy: dict[str, float] = field(default_factory=dict)  # dp-epsilon, ... of the round


def stats_metrics(stats: RoundStats) -> MetricRecord:
    """The round's metrics record: replies, examples, bytes, train loss."""
    m: dict[str, int | float] = {
        "valid-replies": stats.valid,
        "dropped-replies": len(stats.dropped),
        "num-examples": stats.num_examples,
        "bytes-up": stats.bytes_up,
        "bytes-down": stats.bytes_down,
    }
    if math.isfinite(stats.train_loss):
        m["train-loss"] = stats.train_loss
    return metrics_record(m)
