"""Coordinate-wise trimmed mean (FedTrimmedAvg).

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018, Definition 2: at each coordinate drop the ``cut = floor(beta · n)`` largest and
smallest values and average the rest. Matches Flower's ``FedTrimmedAvg`` (``beta=0.2``,
``int(beta * n)`` per tail, unweighted). Client weights are ignored. Batch method, chunked
over coordinates. Since ``beta < 0.5``, at least one value always remains.
"""

from __future__ import annotations

from torch import Tensor

from .base import CoordinatewiseMerger, check_range, register


@register("trimmed-mean")
class TrimmedMean(CoordinatewiseMerger):
    """Mean of the values left after removing ``floor(beta·n)`` from each tail."""

    def __init__(self, beta: float = 0.2) -> None:
        self.beta = check_range("beta", beta, 0.0, 0.5, hi_open=True)

    def _cut(self, n: int) -> int:
        return int(self.beta * n * (1.0 + 1e-12))

    def _combine(self, x: Tensor, w: Tensor) -> Tensor:
        n = x.shape[0]
        c = self._cut(n)
        s = x.sort(dim=0).values
        return s[c : n - c].mean(dim=0)
