"""``srht``: subsampled randomized Hadamard transform per block, O(d log d).

``y = S H D x`` with ``D`` random signs, ``H`` the orthonormal Walsh–Hadamard matrix of size
``n = 2^⌈log2 d⌉`` (the block zero-padded) and ``S`` K rows drawn without replacement
(Ailon & Chazelle 2006; Tropp 2011). Reconstruction ``x̂ = (n/K) P D Hᵀ Sᵀ y`` (``P``
truncates the padding) is unbiased since ``E[SᵀS] = (K/n) I``. Exact MSE (derived in
``omega``): ``E‖x̂−x‖² = (n−K)(d−1) / (K(n−1)) ‖x‖²`` — ``(d−K)/K`` without padding, and
padding does not hurt because the error that lands in the padded coordinates is discarded.

Block l: signs ``rng.rademacher(key, 2l, d)``, rows ``rng.choice(key, 2l+1, n, K)``. The FWHT
is a sequence of exact elementwise butterflies (no BLAS, no atomics), so decoded values are
bit-identical on every IEEE device.
"""

from __future__ import annotations

import dataclasses

import torch

from fedtune import rng
from fedtune.codecs.projection import ProjectionCodec
from fedtune.codecs.registry import register


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last dim (a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        v = y.view(-1, n // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).view(-1, n)
        h *= 2
    return y.view(*lead, n)


def _pow2(d: int) -> int:
    return 1 << max(0, (d - 1).bit_length())


@register("srht")
@dataclasses.dataclass
class SRHTCodec(ProjectionCodec):
    """Random signs + fast Walsh–Hadamard + K rows without replacement, per block."""

    name = "srht"

    def project(self, x: torch.Tensor, k: int, key: int, block: int) -> torch.Tensor:
        d = x.numel()
        n = _pow2(d)
        z = torch.zeros(n, dtype=torch.float32, device=x.device)
        z[:d] = x * rng.rademacher(key, 2 * block, d, device=x.device)
        rows = rng.choice(key, 2 * block + 1, n, k, device=x.device)
        return fwht(z)[rows] * (n**-0.5)

    def reconstruct(self, y: torch.Tensor, d: int, key: int, block: int) -> torch.Tensor:
        n, k = _pow2(d), y.numel()
        z = torch.zeros(n, dtype=torch.float32)
        z[rng.choice(key, 2 * block + 1, n, k)] = y
        return fwht(z)[:d] * rng.rademacher(key, 2 * block, d) * (n**0.5 / k)

    def omega(self, d: int, k: int) -> float:
        # E e_i^2 = (n-K)/(K(n-1)) (||x||^2 - x_i^2) for every i, summed over the d real coords
        n = _pow2(d)
        return (n - k) * (d - 1) / (k * (n - 1)) if n > 1 else 0.0

    def coef_std(self, d: int, k: int) -> float:
        return _pow2(d) ** -0.5
