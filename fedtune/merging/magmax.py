"""MagMax: keep, per coordinate, the client value with the largest magnitude.

Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
ECCV 2024, §3 ("max magnitude" selection); reference ``fusion_bench/method/magmax``.
Ties in ``|·|`` go to the client added later, as in the reference. The paper has no
client weights; here they are ignored except that a zero-weight client is skipped.

Steps (:mod:`.task_vectors`): no sparsification, ``merge="max-magnitude"``, scale.
Streaming: one running vector.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .task_vectors import Steps, TaskVectorMerger, check_scale, set_checked


@dataclass(frozen=True)
class MagMaxOptions:
    scale: float = 1.0

    def __post_init__(self) -> None:
        set_checked(self, scale=check_scale(self.scale))

    def steps(self) -> Steps:
        return Steps(merge="max-magnitude", scale=self.scale)


@register("magmax")
class MagMax(TaskVectorMerger):
    """Per-coordinate max-magnitude selection (streaming, d floats of state)."""

    Options = MagMaxOptions
