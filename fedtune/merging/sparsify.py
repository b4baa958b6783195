"""Shared sparsification and sign-election primitives for the merge methods.

* :func:`kth_largest_abs` -- the exact k-th largest ``|x|`` over several tensors without
  concatenating them: a two-pass 16-bit radix select on the fp32 bit patterns (for
  non-negative floats the int32 view is monotone), run chunk by chunk, so the extra memory
  is O(chunk) and there is no 2**24 size limit (``torch.quantile`` has one, pytorch#64947).
* :func:`topk_count` -- how many entries a ``density`` keeps (``floor(density * n)``, the
  rule of PEFT's ``magnitude_based_pruning`` and of the TIES reference code).
* :func:`magnitude_mask` -- keep ``|x| >= t`` and ``x != 0`` (zeros are never "kept").
* :class:`SignedAccumulator` -- the O(d) streaming state of TIES-style elect + disjoint
  mean: per-sign running sums of ``w * x`` and of ``w`` (4 vectors).
* :func:`bernoulli_keep` -- the DARE keep mask drawn from :mod:`fedtune.rng`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

#: Elements processed at once by a pass over a large tensor on CPU. 2**15 fp32 = 128 KiB
#: keeps every temporary under glibc's mmap threshold and in L2: measured on CPU, 2**16 or
#: 2**20-element chunks made the TIES accumulator 3-20x slower (an mmap/munmap and
#: page-fault per temporary). Accelerators use larger chunks (kernel-launch overhead).
CHUNK = 1 << 15
DEVICE_CHUNK = 1 << 22
#: Below this many elements a plain ``torch.kthvalue`` on a concatenation is used.
SMALL = 1 << 16


def chunk_size(d: int, device: torch.device | None = None) -> int:
    """Chunk length for one pass over ``d`` coordinates on ``device`` (see ``CHUNK``)."""
    if device is not None and device.type != "cpu":
        return max(CHUNK, min(DEVICE_CHUNK, d // 16))
    return CHUNK


def topk_count(density: float, n: int) -> int:
    """Entries kept out of ``n`` at ``density``: ``floor(density * n)``.

    A relative epsilon absorbs float noise such as ``0.29 * 100 = 28.999999999999996``.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return min(n, math.floor(density * n * (1.0 + 1e-12)))


def _chunks(flat: Tensor, chunk: int) -> Iterable[Tensor]:
    for s in range(0, flat.numel(), chunk):
        yield flat[s : s + chunk]


def _sortable(c: Tensor, nonneg: bool = False) -> Tensor:
    """fp32 -> int32 with the same order (IEEE total order, -0 < +0), as signed integers."""
    b = c.contiguous().view(torch.int32)
    if nonneg:  # values >= +0: the bit pattern already orders them
        return b
    # Negative floats order backwards as integers: flip their 31 magnitude bits.
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def _unsortable(b: int) -> float:
    """Inverse of :func:`_sortable` for one (signed 32-bit) value."""
    if b < 0:
        b ^= 0x7FFFFFFF
    return float(torch.tensor([b], dtype=torch.int32).view(torch.float32)[0])


def kth_smallest(chunks: Callable[[], Iterable[Tensor]], k: int, *, nonneg: bool = False) -> float:
    """Exact k-th smallest (1-based) fp32 value over the chunks yielded by ``chunks()``.

    ``chunks`` is called twice (two radix passes of 16 bits on the order-preserving int32
    image of the floats), so it may regenerate derived values chunk by chunk instead of
    holding them. Ties count with multiplicity. NaNs are not allowed. Histograms use
    ``index_add_`` (``torch.bincount`` has a large fixed cost per call on CPU, ~30 ms with
    2**16 bins).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hist: Tensor | None = None
    total = 0
    for c in chunks():
        if c.dtype != torch.float32:
            raise ValueError("kth_smallest expects fp32 values")
        u = _sortable(c.reshape(-1), nonneg)
        if hist is None:
            hist = torch.zeros(1 << 16, dtype=torch.int64, device=u.device)
        # arithmetic shift keeps the sign: high half in [-2**15, 2**15); shift to [0, 2**16)
        hist.index_add_(0, (u >> 16) + (1 << 15), _ones(u))
        total += c.numel()
    if hist is None or k > total:
        raise ValueError(f"k={k} is larger than the number of values ({total})")
    hi, k2 = _select_bin(hist, k)
    hi_signed = hi - (1 << 15)
    lo_hist = torch.zeros_like(hist)
    for c in chunks():
        u = _sortable(c.reshape(-1), nonneg)
        lo_hist.index_add_(0, u & 0xFFFF, ((u >> 16) == hi_signed).to(torch.int64))
    lo, _ = _select_bin(lo_hist, k2)
    return _unsortable((hi_signed << 16) | lo)


def _ones(u: Tensor) -> Tensor:
    return torch.ones(1, dtype=torch.int64, device=u.device).expand(u.numel())


def _select_bin(hist: Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th smallest element, and k's rank within that bin."""
    csum = torch.cumsum(hist, 0)
    idx = int(torch.searchsorted(csum, torch.tensor([k], dtype=csum.dtype, device=csum.device))[0])
    below = int(csum[idx - 1]) if idx > 0 else 0
    return idx, k - below


def kth_largest_abs(tensors: Sequence[Tensor], k: int) -> Tensor:
    """Exact k-th largest ``|x|`` (1-based) over all elements of ``tensors`` (fp32).

    Returns a 0-d fp32 tensor on the tensors' device. Ties count with multiplicity, so
    ``|x| >= result`` selects at least ``k`` entries (more when the threshold is tied).
    Small inputs use ``torch.kthvalue`` on a concatenation; large ones the chunked radix
    select :func:`kth_smallest` (O(chunk) extra memory).
    """
    flats = [t.reshape(-1) for t in tensors]
    total = sum(f.numel() for f in flats)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    if any(f.dtype != torch.float32 for f in flats):
        raise ValueError("kth_largest_abs expects fp32 tensors")
    device = flats[0].device
    if total <= SMALL:
        a = torch.cat([f.abs() for f in flats])
        return torch.kthvalue(a, total - k + 1).values
    step = chunk_size(total, device)
    v = kth_smallest(
        lambda: (c.abs() for f in flats for c in _chunks(f, step)), total - k + 1, nonneg=True
    )
    return torch.tensor(v, dtype=torch.float32, device=device)


def magnitude_threshold(tensors: Sequence[Tensor], density: float) -> float | None:
    """Threshold ``t`` so that ``|x| >= t`` keeps the top ``density`` fraction by magnitude.

    ``None`` means "keep every non-zero" (``floor(density * n) == n``); ``inf`` means keep
    nothing (``floor(density * n) == 0``).
    """
    n = sum(t.numel() for t in tensors)
    k = topk_count(density, n)
    if k >= n:
        return None
    if k == 0:
        return math.inf
    return float(kth_largest_abs(tensors, k))


def magnitude_mask(x: Tensor, threshold: float | None) -> Tensor:
    """Boolean mask of the entries kept: ``|x| >= threshold`` and ``x != 0``."""
    if threshold is None or threshold <= 0:
        return x != 0
    return x.abs() >= threshold


def bernoulli_keep(
    key: int, n: int, keep_prob: float, offset: int = 0, device: torch.device | None = None
) -> Tensor:
    """DARE keep mask: element ``i`` is kept iff ``U(key, stream 0, offset + i) < keep_prob``.

    Drawn from :func:`fedtune.rng.uniform`, so it does not depend on chunking or device.
    """
    from fedtune import rng

    return rng.uniform(key, 0, n, offset=offset, device=device) < keep_prob


class SignedAccumulator:
    """Streaming TIES elect + disjoint weighted mean over a flat vector of ``d`` coordinates.

    State (4 fp32 vectors): ``pos_sum = Σ w_i x_i [x_i > 0]``, ``neg_sum`` likewise for
    ``x_i < 0``, and ``pos_w = Σ w_i [x_i > 0]``, ``neg_w``. At the end the elected sign is
    ``sign(pos_sum + neg_sum) = sign(Σ w_i x_i)`` and the result is ``pos_sum / pos_w`` where
    it is positive, ``neg_sum / neg_w`` where negative, and 0 where the sum is exactly 0.
    """

    def __init__(self, d: int, device: torch.device) -> None:
        z = lambda: torch.zeros(d, dtype=torch.float32, device=device)  # noqa: E731
        self.pos_sum, self.neg_sum, self.pos_w, self.neg_w = z(), z(), z(), z()

    def add(self, offset: int, x: Tensor, weight: float, threshold: float | None = None) -> None:
        """Add ``weight * x`` for the entries with ``|x| >= threshold`` (all when ``None``).

        Zeros never count (they belong to neither sign), whatever the threshold.
        """
        if threshold is not None and math.isinf(threshold):
            return
        sl = slice(offset, offset + x.numel())
        if threshold is None or threshold <= 0:
            pos, neg = x > 0, x < 0
        else:  # x >= t > 0 is "kept and positive" in one comparison
            pos, neg = x >= threshold, x <= -threshold
        # float masks + addcmul: ~3x faster on CPU than torch.where with a scalar
        for mask, s, w in ((pos, self.pos_sum, self.pos_w), (neg, self.neg_sum, self.neg_w)):
            m = mask.to(torch.float32)
            s[sl].addcmul_(x, m, value=weight)
            w[sl].add_(m, alpha=weight)

    def finish(self) -> Tensor:
        """The disjoint weighted mean; computed chunk by chunk into ``pos_sum`` (consumed)."""
        out = self.pos_sum
        step = chunk_size(out.numel(), out.device)
        for s in range(0, out.numel(), step):
            sl = slice(s, s + step)
            p, n = self.pos_sum[sl], self.neg_sum[sl]
            total = p + n
            # Where the elected sign is +, pos_w > 0 (some client contributed a positive
            # value), so the clamp only guards the coordinates that are masked out anyway.
            r = torch.where(total > 0, p / self.pos_w[sl].clamp_min(1e-30), 0.0)
            r = torch.where(total < 0, n / self.neg_w[sl].clamp_min(1e-30), r)
            out[sl] = r
        del self.neg_sum, self.pos_w, self.neg_w
        return out
