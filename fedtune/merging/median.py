"""Coordinate-wise median (FedMedian).

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018, Definition 1 (coordinate-wise median). Like Flower's ``FedMedian``
(``np.median``), an even number of clients gives the mean of the two middle values, and
the client weights are ignored (the estimator is unweighted by definition). Batch method,
chunked over coordinates (O(n · chunk) memory).
"""

from __future__ import annotations

from torch import Tensor

from .base import CoordinatewiseMerger, register


@register("median")
class Median(CoordinatewiseMerger):
    """Unweighted coordinate-wise median of the client deltas."""

    def _combine(self, x: Tensor, w: Tensor) -> Tensor:
        n = x.shape[0]
        s = x.sort(dim=0).values
        if n % 2:
            return s[n // 2]
        return (s[n // 2 - 1] + s[n // 2]) * 0.5
