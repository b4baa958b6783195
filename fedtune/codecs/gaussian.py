"""``gaussian``: the Ferret reference codec, dense Gaussian bases per block.

Ferret (Shu et al., arXiv 2409.06277, eq. 6–8): ``γ = (ρK)⁻¹ VᵀΔ``, ``Δ̃ = V γ`` with
``V ∈ R^{d×K}`` random and ``ρ = Var(v_ij)``. We use standard normal entries (``ρ = 1``), so
the decoder computes ``Δ̂ = K⁻¹ Σ_k ⟨v_k, Δ⟩ v_k``. Ferret's truncated normal on
``[−1/√d, 1/√d]`` gives the same estimator up to the kurtosis term: scaling ``v`` by ``c``
scales ``VVᵀ/(ρK)`` by ``c²/c² = 1``. Exact MSE with iid unit-variance entries of kurtosis
``κ``: ``(d−2+κ)/K ‖Δ‖²`` = ``(d+1)/K ‖Δ‖²`` here (research note §4).

NOTE on the reference code: Ferret's released optimizer scales by ``d/K`` instead of
``1/(ρK) ≈ 3d/K``, so its ``E[Δ̃] = Δ/3`` (compensated by a server lr of 10); we implement
the paper's unbiased scaling.

Cost O(K·d) normals per block (the slow reference; use ``srht``/``countsketch`` in practice).
Basis row k of block l is ``rng.normal(key, stream=l, n=d, offset=k·d)``: bit-identical on
every device; the projection sums use BLAS, so decoded floats agree across devices only to
rounding (use ``srht``/``countsketch`` for bit-identical decoding).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from fedtune import rng
from fedtune.codecs.projection import ProjectionCodec
from fedtune.codecs.registry import register


def _rows(gen, key: int, block: int, d: int, k: int, budget: int, device):  # type: ignore[no-untyped-def]
    """Yield (k0, k1, V[k0:k1]) chunks of the K×d basis of one block."""
    step = max(1, budget // max(1, d))
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        v = gen(key, block, (k1 - k0) * d, offset=k0 * d, device=device).view(k1 - k0, d)
        yield k0, k1, v


@register("gaussian")
@dataclasses.dataclass
class GaussianCodec(ProjectionCodec):
    """Dense N(0,1) bases, unbiased ``1/K`` reconstruction (Ferret with ρ = 1)."""

    replayable: ClassVar[bool] = False  # its decoder sums dense bases with BLAS

    name = "gaussian"
    _generator = staticmethod(rng.normal)

    def project(self, x: torch.Tensor, k: int, key: int, block: int) -> torch.Tensor:
        y = torch.empty(k, dtype=torch.float32, device=x.device)
        for k0, k1, v in _rows(
            self._generator, key, block, x.numel(), k, self._ROWS_BUDGET, x.device
        ):
            y[k0:k1] = v @ x
        return y

    def reconstruct(
        self, y: torch.Tensor, d: int, key: int, block: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = torch.zeros(d, dtype=torch.float32)
        for k0, k1, v in _rows(self._generator, key, block, d, y.numel(), self._ROWS_BUDGET, None):
            out += y[k0:k1] @ v
        return out / y.numel()

    def omega(self, d: int, k: int) -> float:
        return (d + 1) / k  # kurtosis 3

    def coef_std(self, d: int, k: int) -> float:
        return 1.0
