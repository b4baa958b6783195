"""Consensus merging with TALL masks.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression",
ICML 2024, Eq. (3)-(5); code ``nik-dim/tall_masks src/utils/tallmask_utils.py``. With the
multi-task vector ``τ_MTL = Σ_t τ_t``, task t's mask is ``m_t = 1[|τ_t| > λ |τ_MTL − τ_t|]``
(strict ``>``), and coordinates kept by fewer than ``min_agree`` (k) masks are zeroed:
``θ = θ_0 + α · 1[Σ_t m_t >= k] ⊙ τ_MTL``.

Weights (deviation; the paper has none): client t's contribution is ``w̃_t τ_t`` with
``w̃_t = w_t / mean(w)``, so equal weights give exactly the paper's masks. The output is
``scale · mask ⊙ Σ w_t τ_t / Σ w_t`` (the paper's ``τ_MTL / n`` with equal weights), so that
scale = 1 is FedAvg-sized. Defaults: λ = 0.6 (FusionBench ``tall_mask_lambda``), k = 2.

The reference makes two passes (τ_MTL, then masks); holding all deltas, this does both per
coordinate chunk, O(n · chunk) memory. Fewer clients than ``min_agree`` raise.
"""

from __future__ import annotations

from torch import Tensor

from .base import CoordinatewiseMerger, check_range, register


@register("consensus")
class Consensus(CoordinatewiseMerger):
    """Keep the coordinates that at least ``min_agree`` TALL masks select."""

    def __init__(self, tall_lambda: float = 0.6, min_agree: int = 2, scale: float = 1.0) -> None:
        self.tall_lambda = check_range("tall_lambda", tall_lambda, 0.0, 1e6)
        if int(min_agree) != min_agree or min_agree < 0:
            raise ValueError(f"min_agree must be an int >= 0, got {min_agree!r}")
        self.min_agree = int(min_agree)
        self.scale = check_range("scale", scale, -1e6, 1e6)

    def _check_n(self, n: int) -> None:
        if n < self.min_agree:
            raise ValueError(
                f"consensus with min_agree={self.min_agree} needs >= that many clients, got {n}"
            )

    def _combine(self, x: Tensor, w: Tensor) -> Tensor:
        wt = (w / w.mean())[:, None]
        contrib = wt * x
        mtl = contrib.sum(dim=0)
        masks = contrib.abs() > self.tall_lambda * (mtl[None, :] - contrib).abs()
        keep = masks.sum(dim=0) >= self.min_agree
        mean = mtl / x.shape[0]
        return (mean * keep) * self.scale
