"""``srht``: subsampled randomized Hadamard transform per block, O(d log d).

``y = S H D x`` with ``D`` random signs, ``H`` the orthonormal Walsh–Hadamard matrix of size
``n = 2^⌈log2 d⌉`` (the block zero-padded) and ``S`` K rows drawn without replacement
(Ailon & Chazelle 2006; Tropp 2011). Reconstruction ``x̂ = (n/K) P D Hᵀ Sᵀ y`` (``P``
truncates the padding) is unbiased since ``E[SᵀS] = (K/n) I``. Exact MSE (derived in
``omega``): ``E‖x̂−x‖² = (n−K)(d−1) / (K(n−1)) ‖x‖²`` — ``(d−K)/K`` without padding, and
padding does not hurt because the error that lands in the padded coordinates is discarded.

Block l: signs ``rng.rademacher(key, 2l, d)``, rows ``rng.choice(key, 2l+1, n, K)``. The FWHT
is a sequence of exact elementwise butterflies (no BLAS, no atomics), so decoded values are
bit-identical on every IEEE device. On CPU with numba the sign flip reads its bits straight
from Philox, the butterflies run in place per row and the row choice is a single pass
(:mod:`fedtune.kernels`): the same values as the numpy/torch path (tested), 3-7x faster.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import ClassVar

import numpy as np
import torch

from fedtune import kernels, rng
from fedtune.codecs.projection import ProjectionCodec
from fedtune.codecs.registry import register


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last dim (a power of two).

    Butterflies only, in a fixed order, so the result is bit-identical on every IEEE device.
    CPU: numpy radix-4 (two radix-2 stages per pass with the same roundings; numpy's single
    thread avoids torch's thread-pool overhead on small arrays); other devices: torch radix-2.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    if x.device.type == "cpu":
        with np.errstate(over="ignore", invalid="ignore"):  # callers check finiteness
            out = _fwht_numpy(x.detach().reshape(-1, n).numpy())
        return torch.from_numpy(out).view(x.shape)
    return _fwht_torch(x)


def _fwht_torch(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        v = y.view(-1, n // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).view(-1, n)
        h *= 2
    return y.view(x.shape)


def _fwht_numpy(x: np.ndarray) -> np.ndarray:
    m, n = x.shape
    if n >= 256:
        # Stages h = 1..8 act inside groups of 16 consecutive elements; with the group axis
        # moved last they run over long contiguous rows (3-5x faster than stride-h loops).
        t = np.ascontiguousarray(x.reshape(m, n // 16, 16).transpose(0, 2, 1))
        t = _stages(t.reshape(m, 16, n // 16), 16, n // 16)
        x = np.ascontiguousarray(t.reshape(m, 16, n // 16).transpose(0, 2, 1)).reshape(m, n)
        return _stages(x[:, :, None], n, 1, first=16).reshape(m, n)
    return _stages(x[:, :, None].copy(), n, 1).reshape(m, n)


def _stages(src: np.ndarray, n: int, inner: int, first: int = 1) -> np.ndarray:
    """Butterfly stages h = first, 2 first, ... < n along axis 1 of an (m, n, inner) array.

    Radix-4 where possible: (a,b,c,d) -> ((a+b)+(c+d), (a-b)+(c-d), (a+b)-(c+d), (a-b)-(c-d)),
    exactly the values two radix-2 stages compute, in half the passes.
    """
    m = src.shape[0]
    dst = np.empty_like(src)
    tmp = [np.empty(max(1, m * n * inner // 4), dtype=src.dtype) for _ in range(4)]
    h = first
    while h < n:
        if 4 * h <= n:
            g = n // (4 * h)
            v, o = src.reshape(m, g, 4, h * inner), dst.reshape(m, g, 4, h * inner)
            s1, d1, s2, d2 = (t[: m * g * h * inner].reshape(m, g, h * inner) for t in tmp)
            np.add(v[:, :, 0], v[:, :, 1], out=s1)
            np.subtract(v[:, :, 0], v[:, :, 1], out=d1)
            np.add(v[:, :, 2], v[:, :, 3], out=s2)
            np.subtract(v[:, :, 2], v[:, :, 3], out=d2)
            np.add(s1, s2, out=o[:, :, 0])
            np.add(d1, d2, out=o[:, :, 1])
            np.subtract(s1, s2, out=o[:, :, 2])
            np.subtract(d1, d2, out=o[:, :, 3])
            h *= 4
        else:
            g = n // (2 * h)
            v, o = src.reshape(m, g, 2, h * inner), dst.reshape(m, g, 2, h * inner)
            np.add(v[:, :, 0], v[:, :, 1], out=o[:, :, 0])
            np.subtract(v[:, :, 0], v[:, :, 1], out=o[:, :, 1])
            h *= 2
        src, dst = dst, src
    return src


_SCRATCH = threading.local()


def _scratch(rows: int, n: int) -> np.ndarray:
    """A reused (rows, n) float32 work array (contents undefined), one per thread.

    ``_BATCH`` elements (4 MiB), or as many as the largest group needed (one padded block of
    up to ``max_block``). Reusing it avoids a fresh allocation per group, whose first touch
    costs a page fault per 4 KiB: a third of the transform's time.
    """
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < rows * n:
        buf = np.empty(max(rows * n, _BATCH), dtype=np.float32)
        _SCRATCH.buf = buf
    return buf[: rows * n].reshape(rows, n)


def _rows(key: int, stream: int, n: int, k: int) -> np.ndarray:
    """``rng.choice(key, stream, n, k)`` as numpy, in one compiled pass when ``2k <= n``."""
    if 2 * k <= n:
        return kernels.first_distinct(n, k, kernels.key_words(key, stream, rng.TAG_BITS))
    return rng.choice(key, stream, n, k).numpy()


def _pow2(d: int) -> int:
    return 1 << max(0, (d - 1).bit_length())


_BATCH = 1 << 20  # elements per batched transform (blocks of equal padded size share one)


@register("srht")
@dataclasses.dataclass
class SRHTCodec(ProjectionCodec):
    """Random signs + fast Walsh–Hadamard + K rows without replacement, per block."""

    replayable: ClassVar[bool] = True  # sign flips + exact FWHT butterflies, no BLAS
    name = "srht"

    def project(self, x: torch.Tensor, k: int, key: int, block: int) -> torch.Tensor:
        return self.project_blocks([(x, k, block)], key)[0]

    def reconstruct(
        self, y: torch.Tensor, d: int, key: int, block: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.reconstruct_blocks([(y, d, block)], key, None if out is None else [out])[0]

    def project_blocks(
        self, items: list[tuple[torch.Tensor, int, int]], key: int
    ) -> list[torch.Tensor]:
        if kernels.AVAILABLE and all(x.device.type == "cpu" for x, _, _ in items):
            return self._project_cpu(items, key)
        out: list[torch.Tensor] = [torch.empty(0)] * len(items)
        for group in _groups([(i, x.numel()) for i, (x, _, _) in enumerate(items)]):
            n = _pow2(items[group[0]][0].numel())
            dev = items[group[0]][0].device
            z = torch.zeros(len(group), n, dtype=torch.float32, device=dev)
            for row, i in enumerate(group):
                x, _, blk = items[i]
                z[row, : x.numel()] = x * rng.rademacher(key, 2 * blk, x.numel(), device=dev)
            z = fwht(z)
            for row, i in enumerate(group):
                _, k, blk = items[i]
                rows = rng.choice(key, 2 * blk + 1, n, k, device=dev)
                out[i] = z[row].index_select(0, rows) * (n**-0.5)
        return out

    def reconstruct_blocks(
        self,
        items: list[tuple[torch.Tensor, int, int]],
        key: int,
        outs: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        if kernels.AVAILABLE:
            return self._reconstruct_cpu(items, key, outs)
        out: list[torch.Tensor] = [torch.empty(0)] * len(items)
        for group in _groups([(i, d) for i, (_, d, _) in enumerate(items)]):
            n = _pow2(items[group[0]][1])
            z = torch.zeros(len(group), n, dtype=torch.float32)
            for row, i in enumerate(group):
                y, _, blk = items[i]
                z[row].index_copy_(0, rng.choice(key, 2 * blk + 1, n, y.numel()), y)
            z = fwht(z)
            for row, i in enumerate(group):
                y, d, blk = items[i]
                out[i] = z[row, :d] * rng.rademacher(key, 2 * blk, d) * (n**0.5 / y.numel())
        return out

    # --- CPU path with the compiled kernels (same values as above) ---------------------------

    def _project_cpu(
        self, items: list[tuple[torch.Tensor, int, int]], key: int
    ) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [torch.empty(0)] * len(items)
        one = np.float32(1.0)
        for group in _groups([(i, x.numel()) for i, (x, _, _) in enumerate(items)]):
            n = _pow2(items[group[0]][0].numel())
            z = _scratch(len(group), n)
            for row, i in enumerate(group):
                x, _, blk = items[i]
                xs = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
                signs = kernels.key_words(key, 2 * blk, rng.TAG_SIGN)
                kernels.sign_flip(xs, z[row, : xs.shape[0]], one, signs)
                z[row, xs.shape[0] :] = 0.0  # the zero padding
            kernels.fwht_rows(z)
            scale = np.float32(n**-0.5)
            for row, i in enumerate(group):
                _, k, blk = items[i]
                out[i] = torch.from_numpy(z[row, _rows(key, 2 * blk + 1, n, k)] * scale)
        return out

    def _reconstruct_cpu(
        self,
        items: list[tuple[torch.Tensor, int, int]],
        key: int,
        outs: list[torch.Tensor] | None,
    ) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [torch.empty(0)] * len(items)
        for group in _groups([(i, d) for i, (_, d, _) in enumerate(items)]):
            n = _pow2(items[group[0]][1])
            z = _scratch(len(group), n)
            z[...] = 0.0
            for row, i in enumerate(group):
                y, _, blk = items[i]
                z[row, _rows(key, 2 * blk + 1, n, y.numel())] = y.detach().cpu().numpy()
            kernels.fwht_rows(z)
            for row, i in enumerate(group):
                y, d, blk = items[i]
                xhat = outs[i] if outs is not None else torch.empty(d, dtype=torch.float32)
                scale = np.float32(n**0.5 / y.numel())
                signs = kernels.key_words(key, 2 * blk, rng.TAG_SIGN)
                kernels.sign_flip(z[row, :d], xhat.numpy(), scale, signs)
                out[i] = xhat
        return out

    def omega(self, d: int, k: int) -> float:
        # E e_i^2 = (n-K)/(K(n-1)) (||x||^2 - x_i^2) for every i, summed over the d real coords
        n = _pow2(d)
        return (n - k) * (d - 1) / (k * (n - 1)) if n > 1 else 0.0

    def coef_std(self, d: int, k: int) -> float:
        return _pow2(d) ** -0.5


def _groups(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices grouped by padded size, each group at most ``_BATCH`` elements (order kept)."""
    by_n: dict[int, list[int]] = {}
    for i, d in sizes:
        by_n.setdefault(_pow2(d), []).append(i)
    out: list[list[int]] = []
    for n, idx in by_n.items():
        per = max(1, _BATCH // n)
        out.extend(idx[j : j + per] for j in range(0, len(idx), per))
    return out
