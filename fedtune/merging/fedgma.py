"""FedGMA: gradient-masked averaging by sign agreement.

Tenison et al., "Gradient Masked Averaging for Federated Learning", TMLR 2023, Alg. 1;
the form follows declearn's ``GradientMaskedAveraging``: per coordinate
``agree = |Σ_i w_i sign(τ_i)| / Σ_i w_i``; ``score = 1`` if ``agree >= threshold`` else
``agree``; the result is ``score ⊙ Σ_i w_i τ_i / Σ_i w_i``. ``threshold=0`` is FedAvg.
Streaming: two running vectors (the weighted sum and the weighted sign sum).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Delta, FlatLayout, StreamingMerger, check_range, register
from .sparsify import chunk_size


@register("fedgma")
class FedGMA(StreamingMerger):
    """FedAvg damped where clients disagree on the sign."""

    def __init__(self, threshold: float = 1.0) -> None:
        super().__init__()
        self.threshold = check_range("threshold", threshold, 0.0, 1.0)
        self._sum: Tensor | None = None
        self._sign: Tensor | None = None

    def _reset_state(self) -> None:
        self._sum = self._sign = None

    def _begin(self, layout: FlatLayout) -> None:
        self._sum, self._sign = layout.zeros(), layout.zeros()

    def _add(self, layout: FlatLayout, delta: Delta, weight: float, key: int | None) -> None:
        assert self._sum is not None and self._sign is not None
        for off, x in layout.pieces(delta, chunk_size(layout.total, layout.device)):
            sl = slice(off, off + x.numel())
            self._sum[sl].add_(x, alpha=weight)
            self._sign[sl].add_(torch.sign(x), alpha=weight)

    def _finish(self, layout: FlatLayout) -> Tensor:
        assert self._sum is not None and self._sign is not None
        agree = self._sign.abs_().div_(self._weight_sum)
        # A small slack so that full agreement computed in floating point counts as 1.
        score = torch.where(agree >= self.threshold - 1e-6, 1.0, agree)
        return self._sum.div_(self._weight_sum).mul_(score)
