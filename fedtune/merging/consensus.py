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

Not a :mod:`.task_vectors` pipeline: its sparsification (the TALL masks) depends on the sum
of *all* clients, so it cannot run per client in ``add``. It is elementwise, though, so a
:class:`.base.CoordinatewiseMerger` does both of the reference's passes (τ_MTL, then masks)
per coordinate chunk, O(n · chunk) memory; the options and the final scale are the shared
ones. Fewer clients than ``min_agree`` raise.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import CoordinatewiseMerger, check_range, register
from .task_vectors import WithOptions, check_scale, scaled, set_checked


@dataclass(frozen=True)
class ConsensusOptions:
    tall_lambda: float = 0.6
    min_agree: int = 2
    scale: float = 1.0

    def __post_init__(self) -> None:
        set_checked(self, tall_lambda=check_range("tall_lambda", self.tall_lambda, 0.0, 1e6))
        if int(self.min_agree) != self.min_agree or self.min_agree < 0:
            raise ValueError(f"min_agree must be an int >= 0, got {self.min_agree!r}")
        set_checked(self, min_agree=int(self.min_agree), scale=check_scale(self.scale))


@register("consensus")
class Consensus(WithOptions, CoordinatewiseMerger):
    """Keep the coordinates that at least ``min_agree`` TALL masks select."""

    Options = ConsensusOptions
    options: ConsensusOptions

    def _check_n(self, n: int) -> None:
        if n < self.options.min_agree:
            raise ValueError(
                f"consensus with min_agree={self.options.min_agree} needs >= that many clients,"
                f" got {n}"
            )

    def _combine(self, x: Tensor, w: Tensor) -> Tensor:
        contrib = (w / w.mean())[:, None] * x
        mtl = contrib.sum(dim=0)
        masks = contrib.abs() > self.options.tall_lambda * (mtl[None, :] - contrib).abs()
        keep = masks.sum(dim=0) >= self.options.min_agree
        return scaled((mtl / x.shape[0]) * keep, self.options.scale)
