"""MagMax: keep, per coordinate, the client value with the largest magnitude.

Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
ECCV 2024, §3 ("max magnitude" selection); reference ``fusion_bench/method/magmax``.
Ties in ``|·|`` go to the client added later, as in the reference. The paper has no
client weights; here they are ignored except that a zero-weight client is skipped. Streaming: one running vector; ``scale`` multiplies the result.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Delta, FlatLayout, StreamingMerger, check_range, register
from .sparsify import chunk_size


@register("magmax")
class MagMax(StreamingMerger):
    """Per-coordinate max-magnitude selection (streaming, d floats of state)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = check_range("scale", scale, -1e6, 1e6)
        self._best: Tensor | None = None

    def _reset_state(self) -> None:
        self._best = None

    def _begin(self, layout: FlatLayout) -> None:
        self._best = layout.zeros()

    def _add(self, layout: FlatLayout, delta: Delta, weight: float, key: int | None) -> None:
        assert self._best is not None
        if weight == 0:
            return
        for off, x in layout.pieces(delta, chunk_size(layout.total, layout.device)):
            b = self._best[off : off + x.numel()]
            b.copy_(torch.where(x.abs() >= b.abs(), x, b))

    def _finish(self, layout: FlatLayout) -> Tensor:
        assert self._best is not None
        return self._best.mul_(self.scale)
