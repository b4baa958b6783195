"""Model Stock: interpolate toward the base by the clients' angular agreement.

Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024, Eq. (4);
form as mergekit ``merge_methods/model_stock.py``. Per tensor, with ``cos θ`` the mean
pairwise cosine between client deltas, ``t = n cos θ / (1 + (n − 1) cos θ)`` and the merged
delta is ``t · mean_i(τ_i)`` (i.e. ``θ_H = t·mean(θ_i) + (1 − t)·θ_0``).

Streaming via the identity ``Σ_{i≠j} u_i·u_j = ‖Σ_i u_i‖² − Σ_i ‖u_i‖²`` with
``u_i = τ_i / ‖τ_i‖`` (a zero delta has ``u_i = 0``, cosine 0 as mergekit's norm clamp gives):
state is ``Σ w_i τ_i`` and ``Σ u_i`` (2·d floats) plus two scalars per tensor.

Deviations: the mean is weighted by the client weights (the cosine is not); ``cos θ`` is
clamped to ``[0, 1]`` so ``t`` stays in ``[0, 1]`` (mergekit does not clamp; a negative mean
cosine would give ``t < 0`` or a division by zero). Needs at least 2 clients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Delta, FlatLayout, StreamingMerger, register


@register("model-stock")
class ModelStock(StreamingMerger):
    """Per-tensor Model Stock ratio times the weighted mean."""

    def __init__(self) -> None:
        super().__init__()
        self._sum: Tensor | None = None
        self._usum: Tensor | None = None
        self._unorm2: list[float] = []

    def _reset_state(self) -> None:
        self._sum = self._usum = None
        self._unorm2 = []

    def _begin(self, layout: FlatLayout) -> None:
        self._sum, self._usum = layout.zeros(), layout.zeros()
        self._unorm2 = [0.0] * len(layout.names)

    def _add(self, layout: FlatLayout, delta: Delta, weight: float, key: int | None) -> None:
        assert self._sum is not None and self._usum is not None
        for i, (off, f) in enumerate(zip(layout.offsets, layout.flat(delta), strict=True)):
            sl = slice(off, off + f.numel())
            self._sum[sl].add_(f, alpha=weight)
            norm = float(torch.linalg.vector_norm(f, dtype=torch.float64))
            if norm > 1e-12:
                self._usum[sl].add_(f, alpha=1.0 / norm)
                self._unorm2[i] += 1.0

    def _finish(self, layout: FlatLayout) -> Tensor:
        assert self._sum is not None and self._usum is not None
        n = self._count
        if n < 2:
            raise ValueError("model-stock needs at least 2 client deltas")
        out = self._sum.div_(self._weight_sum)
        for i, off in enumerate(layout.offsets):
            sl = slice(off, off + layout.shapes[i].numel())
            s2 = float(torch.linalg.vector_norm(self._usum[sl], dtype=torch.float64)) ** 2
            cos = (s2 - self._unorm2[i]) / (n * (n - 1))
            cos = min(1.0, max(0.0, cos))
            t = n * cos / (1 + (n - 1) * cos)
            out[sl].mul_(t)
        return out
