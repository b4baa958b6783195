"""Portable counter-based random streams: the only source of randomness in fedtune.

Every draw is a pure function of ``(key, stream, i)``: element ``i`` of a stream does not
depend on how many elements were drawn before it, on the chunk size (``offset``), on the
thread count or on the device. Anything that must be regenerated elsewhere (projection
bases, SPSA directions, DARE masks, stochastic rounding) comes from here with an explicit
key; torch's global RNG is never used for it (its CPU and CUDA streams differ, CUDA streams
depend on the GPU's SM count, and CPU seeds are truncated to 32 bits).

Generator: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC'11), checked against the Random123 known-answer vectors in the tests. The 64-bit key is
the Philox key (two 32-bit words). The 128-bit counter is
``(block_lo, block_hi | tag << 24, stream_lo, stream_hi)`` where ``block`` indexes groups of
four 32-bit outputs and ``tag`` separates the kinds of draw (integers, signs, normals), so
``normal`` and ``rademacher`` on the same ``(key, stream)`` are independent.

Everything is vectorised (no Python loop over elements). On CPU the Philox rounds run in
numpy on uint64 arrays, where a 32x32-bit product fits exactly; on other devices they run in
torch on int64 tensors with the multiplies split into 16-bit halves so no int64 ever
overflows (signed overflow is undefined behaviour in C++/CUDA, and torch has no unsigned
shifts). Both paths are pure integer arithmetic, so the outputs are bit-identical everywhere
(the tests check both paths against a pure-Python reference and Random123's known answers).

Normals use Box–Muller computed in float64 with only ``+ - * /``, ``sqrt`` and exact bit
manipulation (``frexp``): ``log``, ``cos`` and ``sin`` are our own polynomials, because
libm implementations differ in the last ulp between CPU (vectorised vs scalar paths) and
CUDA. IEEE 754 requires ``+ - * / sqrt`` to be correctly rounded; numpy (the CPU path) and
CUDA's float64 ``sqrt`` are, torch's vectorised CPU float64 ``sqrt`` is not (so the CPU path
never uses it), and each torch op is its own kernel, so nothing is contracted into an FMA.
Hence normals are bit-identical on CPU and CUDA (other devices get the CPU result moved to
them). Never ``torch.compile`` this module: fusion could contract the polynomials into FMAs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from fedtune import kernels

__all__ = [
    "bits32",
    "choice",
    "derive_key",
    "normal",
    "rademacher",
    "randint",
    "uniform",
]

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_ROUNDS = 10
_MAX_BLOCK = 1 << 56  # block counter keeps 56 bits; the top 8 hold the tag
TAG_BITS, TAG_SIGN, TAG_NORMAL = 0, 1, 2


def derive_key(*parts: int) -> int:
    """A 64-bit key from any sequence of Python ints (negative allowed), e.g. (seed, round, slot).

    blake2b over a length-prefixed signed encoding of each part, so ``(1, 23)`` and
    ``(12, 3)`` differ and every bit of every part matters.
    """
    h = hashlib.blake2b(digest_size=8, person=b"fedtune-rng-v1")
    h.update(len(parts).to_bytes(4, "little"))
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"derive_key parts must be ints, got {type(p).__name__}")
        raw = p.to_bytes(p.bit_length() // 8 + 1, "little", signed=True)
        h.update(len(raw).to_bytes(4, "little"))
        h.update(raw)
    return int.from_bytes(h.digest(), "little")


def _check(key: int, stream: int, n: int, offset: int) -> None:
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= MASK64:
        raise ValueError(f"rng key must be an int in [0, 2**64), got {key!r}")
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream <= MASK64:
        raise ValueError(f"rng stream must be an int in [0, 2**64), got {stream!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"rng n must be a non-negative int, got {n!r}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"rng offset must be a non-negative int, got {offset!r}")
    if offset + n > _MAX_BLOCK:  # every kind uses <= 4 outputs per block... and >= 1 element
        raise ValueError(f"rng offset + n = {offset + n} exceeds 2**56")


def _philox(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, key: int
) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 counter words (consumed); returns the four output words.

    A round is ``(c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1,
    lo(M0 c0))`` followed by a Weyl bump of the key. ``hi/lo`` of a 32x32-bit product are
    formed from two products with the 16-bit halves of the constant (each < 2**48) so no
    int64 overflows. In-place ops on preallocated buffers: ~2.5x faster than the naive form.
    """
    k0, k1 = key & MASK32, key >> 32
    p0, p1, t = torch.empty_like(c0), torch.empty_like(c0), torch.empty_like(c0)
    q0, q1, u = torch.empty_like(c0), torch.empty_like(c0), torch.empty_like(c0)
    for r in range(_ROUNDS):
        torch.mul(c0, _M0 & 0xFFFF, out=p0)
        torch.mul(c0, _M0 >> 16, out=p1)
        torch.mul(c2, _M1 & 0xFFFF, out=q0)
        torch.mul(c2, _M1 >> 16, out=q1)
        torch.bitwise_and(p1, 0xFFFF, out=t).bitwise_left_shift_(16).add_(p0)  # < 2**49
        torch.bitwise_and(q1, 0xFFFF, out=u).bitwise_left_shift_(16).add_(q0)
        p1.bitwise_right_shift_(16).add_(t.bitwise_right_shift(32))  # hi(M0 c0)
        torch.bitwise_and(t, MASK32, out=p0)  # lo(M0 c0)
        q1.bitwise_right_shift_(16).add_(u.bitwise_right_shift(32))  # hi(M1 c2)
        torch.bitwise_and(u, MASK32, out=q0)  # lo(M1 c2)
        q1.bitwise_xor_(c1).bitwise_xor_(k0)
        p1.bitwise_xor_(c3).bitwise_xor_(k1)
        # new state (q1, q0, p1, p0); the old state's buffers become scratch
        c0, c1, c2, c3, q1, q0, p1, p0 = q1, q0, p1, p0, c0, c1, c2, c3
        if r + 1 < _ROUNDS:
            k0, k1 = (k0 + _W0) & MASK32, (k1 + _W1) & MASK32
    return [c0, c1, c2, c3]


_CHUNK = 1 << 14  # blocks per pass: keeps the scratch buffers in cache


def _blocks(
    key: int, stream: int, tag: int, first: int, count: int, device: torch.device | None
) -> torch.Tensor:
    """Philox output for blocks [first, first+count) as an int64 tensor of shape (count, 4)."""
    if device is None or device.type == "cpu":
        return torch.from_numpy(_blocks_numpy(key, stream, tag, first, count).view(np.int64))
    out = torch.empty((count, 4), dtype=torch.int64, device=device)
    for s in range(0, count, _CHUNK):
        b = torch.arange(
            first + s, first + min(count, s + _CHUNK), dtype=torch.int64, device=device
        )
        hi = (b >> 32).bitwise_or_(tag << 24)
        s0 = torch.full_like(b, stream & MASK32)
        s1 = torch.full_like(b, stream >> 32)
        words = _philox(b.bitwise_and_(MASK32), hi, s0, s1, key)
        out[s : s + b.numel()] = torch.stack(words, dim=1)
    return out


def _blocks_numpy(key: int, stream: int, tag: int, first: int, count: int) -> np.ndarray:
    """CPU path of :func:`_blocks`: the same Philox on uint64 arrays (3-6x faster than torch).

    A 32x32-bit product fits in uint64 exactly, so hi/lo need only a shift and a mask.
    Identical output to the torch path (tested). With numba the rounds run compiled
    (:func:`fedtune.kernels.philox_blocks`, ~10x faster); ``_blocks_numpy_ref`` is the
    pure-numpy version the tests compare it with.
    """
    if kernels.AVAILABLE:
        out = np.empty((count, 4), dtype=np.uint64)
        kernels.philox_blocks(kernels.key_words(key, stream, tag), first, out)
        return out
    return _blocks_numpy_ref(key, stream, tag, first, count)


def _blocks_numpy_ref(key: int, stream: int, tag: int, first: int, count: int) -> np.ndarray:
    """:func:`_blocks_numpy` in numpy only: Philox rounds as passes over uint64 chunks."""
    u = np.uint64
    out = np.empty((count, 4), dtype=np.uint64)
    k0s = [((key & MASK32) + r * _W0) & MASK32 for r in range(_ROUNDS)]
    k1s = [((key >> 32) + r * _W1) & MASK32 for r in range(_ROUNDS)]
    m = min(_CHUNK, count)
    bufs = [np.empty(m, dtype=np.uint64) for _ in range(6)]
    m0, m1, s32, mask = u(_M0), u(_M1), u(32), u(MASK32)
    for s in range(0, count, _CHUNK):
        c = min(_CHUNK, count - s)
        c0, c1, c2, c3, p, q = (buf[:c] for buf in bufs)
        c0[:] = np.arange(first + s, first + s + c, dtype=np.uint64)
        np.right_shift(c0, s32, out=c1)
        c1 |= u(tag << 24)
        c0 &= mask
        c2.fill(stream & MASK32)
        c3.fill(stream >> 32)
        for r in range(_ROUNDS):
            np.multiply(c0, m0, out=p)
            np.multiply(c2, m1, out=q)
            np.right_shift(q, s32, out=c0)
            c0 ^= c1
            c0 ^= u(k0s[r])
            np.bitwise_and(q, mask, out=c1)
            np.right_shift(p, s32, out=c2)
            c2 ^= c3
            c2 ^= u(k1s[r])
            np.bitwise_and(p, mask, out=c3)
        out[s : s + c, 0] = c0
        out[s : s + c, 1] = c1
        out[s : s + c, 2] = c2
        out[s : s + c, 3] = c3
    return out


def _words(
    key: int, stream: int, tag: int, n: int, offset: int, device: torch.device | None
) -> torch.Tensor:
    """32-bit words i in [offset, offset+n) of the (key, stream, tag) sequence (4 per block)."""
    first, last = offset >> 2, (offset + n + 3) >> 2
    w = _blocks(key, stream, tag, first, last - first, device).reshape(-1)
    start = offset & 3
    return w[start : start + n]


def bits32(
    key: int, stream: int, n: int, offset: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """int64 tensor of ``n`` uniform 32-bit values in ``[0, 2**32)``: elements offset..offset+n-1."""
    _check(key, stream, n, offset)
    return _words(key, stream, TAG_BITS, n, offset, _dev(device))


def uniform(
    key: int, stream: int, n: int, offset: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """float32 uniform on ``[0, 1)``: the top 24 bits of :func:`bits32` times 2**-24 (exact)."""
    return (bits32(key, stream, n, offset, device) >> 8).to(torch.float32) * (2.0**-24)


def randint(
    key: int,
    stream: int,
    n: int,
    high: int,
    offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """int64 in ``[0, high)``: ``((bits32 >> 1) * high) >> 31`` (Lemire's multiply-shift).

    The 31-bit product keeps the int64 in range; the non-uniformity is below high / 2**31,
    negligible for hashing and sampling. ``high`` must be in [1, 2**32].
    """
    if not isinstance(high, int) or not 1 <= high <= 1 << 32:
        raise ValueError(f"randint high must be an int in [1, 2**32], got {high!r}")
    return ((bits32(key, stream, n, offset, device) >> 1) * high) >> 31


def rademacher(
    key: int, stream: int, n: int, offset: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """float32 random signs ±1: element i is bit ``i % 32`` of sign-word ``i // 32``.

    Packing 32 signs per Philox output makes signs ~32x cheaper than integers.
    """
    _check(key, stream, n, offset)
    dev = _dev(device)
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=dev)
    first, last = offset >> 5, (offset + n + 31) >> 5
    w = _words(key, stream, TAG_SIGN, last - first, first, dev)
    start = offset & 31
    if w.device.type == "cpu":
        # little-endian bytes of the words, unpacked LSB first = bit (i % 32) of word i // 32
        bits_np = np.unpackbits(w.numpy().astype("<u4").view(np.uint8), bitorder="little")
        signs = 1.0 - 2.0 * bits_np[start : start + n].astype(np.float32)
        return torch.from_numpy(signs)
    return _signs_torch(w, start, n)


def _signs_torch(w: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Torch path of :func:`rademacher`: bit i % 32 of word i // 32, from ``start``."""
    shifts = torch.arange(32, dtype=torch.int64, device=w.device)
    bits = ((w[:, None] >> shifts) & 1).reshape(-1)[start : start + n]
    return (1 - 2 * bits).to(torch.float32)


# --- normals: Box–Muller with portable float64 polynomials ------------------------------------

_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476
_PI_4 = 0.7853981633974483
_TWO_M29 = 2.0**-29


class _NumpyOps:
    """Array ops for the CPU path (numpy: no per-op dispatch overhead on small arrays)."""

    where = staticmethod(np.where)
    frexp = staticmethod(np.frexp)
    sqrt = staticmethod(np.sqrt)

    @staticmethod
    def f64(a: Any) -> Any:
        return a.astype(np.float64)


class _TorchOps:
    """Array ops for the torch path (CUDA and other devices)."""

    where = staticmethod(torch.where)
    frexp = staticmethod(torch.frexp)
    sqrt = staticmethod(torch.sqrt)

    @staticmethod
    def f64(a: Any) -> Any:
        return a.to(torch.float64)


def _fact(n: int) -> float:
    out = 1
    for i in range(2, n + 1):
        out *= i
    return float(out)


# sin = phi * sum (-1)^k phi^(2k)/(2k+1)!, cos = sum (-1)^k phi^(2k)/(2k)!, k = 0..8
_SIN_C = [(-1) ** k / _fact(2 * k + 1) for k in range(9)]
_COS_C = [(-1) ** k / _fact(2 * k) for k in range(9)]


def _log_mantissa(m: Any) -> Any:
    """log(m) for m in [sqrt(1/2), sqrt(2)): 2 atanh(s), s=(m-1)/(m+1), |s|<0.172."""
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    acc = s2 * (1.0 / 19.0) + 1.0 / 17.0
    for k in range(7, -1, -1):  # Horner over 1/(2k+1), k = 9..0 (error < 1e-15)
        acc = acc * s2 + 1.0 / (2 * k + 1)
    return 2.0 * s * acc


def _neg2log_u(w: Any, ops: Any) -> Any:
    """-2 log(u) for u = (w + 0.5) 2**-32 in (0, 1); exact frexp, then a polynomial."""
    v = ops.f64(2 * w + 1)  # odd, < 2**33: exact in float64; u = v * 2**-33
    mant, exp = ops.frexp(v)  # v = mant * 2**exp, mant in [0.5, 1)
    small = mant < _SQRT_HALF
    mant = ops.where(small, mant * 2.0, mant)  # exact scaling by 2
    exp = ops.f64(exp) - ops.f64(small)
    logu = (exp - 33.0) * _LN2 + _log_mantissa(mant)
    return -2.0 * logu


def _sincos(phi: Any) -> tuple[Any, Any]:
    """Taylor sin/cos for phi in [0, pi/4] (error < 1e-15)."""
    p2 = phi * phi
    s = p2 * _SIN_C[8] + _SIN_C[7]
    c = p2 * _COS_C[8] + _COS_C[7]
    for k in range(6, -1, -1):
        s = s * p2 + _SIN_C[k]
        c = c * p2 + _COS_C[k]
    return s * phi, c


def _cos_sin_2pi_u(w: Any, ops: Any) -> tuple[Any, Any]:
    """cos and sin of 2*pi*u, u = (w + 0.5) 2**-32, with octant reduction done on the bits."""
    octant = w >> 29
    low = w & ((1 << 29) - 1)
    odd = (octant & 1) == 1
    # even octant: angle within octant phi = f*pi/4; odd: use the complement so the
    # polynomial argument stays in [0, pi/4] and is computed exactly from integers.
    f_int = ops.where(odd, ((1 << 29) - 1) - low, low)
    phi = (ops.f64(f_int) + 0.5) * (_TWO_M29 * _PI_4)
    sp, cp = _sincos(phi)
    # rotate by the quadrant q: (c, s) -> (c, s), (-s, c), (-c, -s), (s, -c); an odd octant
    # also swaps c and s. Selection and exact sign flips only (no rounding).
    q = octant >> 1
    swap = (octant ^ q) & 1 == 1
    sign_cos = 1.0 - 2.0 * ops.f64((q ^ (q >> 1)) & 1)  # unsigned ints: subtract as floats
    sign_sin = 1.0 - 2.0 * ops.f64(q >> 1)
    return ops.where(swap, sp, cp) * sign_cos, ops.where(swap, cp, sp) * sign_sin


def _box_muller(w: Any, ops: Any) -> tuple[Any, Any]:
    """(r cos t, r sin t) in float64 for word pairs: radius from w[:, 0::2], angle from w[:, 1::2]."""
    r = ops.sqrt(_neg2log_u(w[:, 0::2], ops))
    cos, sin = _cos_sin_2pi_u(w[:, 1::2], ops)
    return r * cos, r * sin


def normal(
    key: int, stream: int, n: int, offset: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """float32 standard normals, bit-identical on every device (see the module docstring).

    Box–Muller: block b gives words (w0, w1, w2, w3) -> elements 4b..4b+3 =
    (r0 cos t0, r0 sin t0, r1 cos t1, r1 sin t1), r = sqrt(-2 log u(w0)), t = 2 pi u(w1).
    With 32-bit uniforms the radius is capped at sqrt(66 ln 2) ~= 6.77 (P(|z| > 6.77) ~ 1e-11).
    """
    _check(key, stream, n, offset)
    dev = _dev(device)
    first, last = offset >> 2, (offset + n + 3) >> 2
    count = last - first
    start = offset & 3
    if dev is None or dev.type != "cuda":
        # CPU path (numpy). Other non-CUDA devices get the CPU result moved over: torch's
        # vectorised CPU float64 sqrt is not correctly rounded (~0.6% of values are 1 ulp
        # off, measured), numpy's and CUDA's are, and e.g. MPS has no float64 at all.
        zn = np.empty((count, 4), dtype=np.float32)
        for s in range(0, count, _CHUNK):  # chunks keep the float64 temporaries in cache
            c = min(_CHUNK, count - s)
            a, b = _box_muller(_blocks_numpy(key, stream, TAG_NORMAL, first + s, c), _NumpyOps)
            zn[s : s + c, 0::2] = a  # float64 -> float32: round to nearest even
            zn[s : s + c, 1::2] = b
        out = torch.from_numpy(zn.reshape(-1)[start : start + n])
        return out if dev is None or dev.type == "cpu" else out.to(dev)
    z = torch.empty((count, 4), dtype=torch.float32, device=dev)
    for s in range(0, count, _CHUNK):
        c = min(_CHUNK, count - s)
        a, b = _box_muller(_blocks(key, stream, TAG_NORMAL, first + s, c, dev), _TorchOps)
        z[s : s + c, 0::2] = a
        z[s : s + c, 1::2] = b
    return z.reshape(-1)[start : start + n]


def choice(
    key: int, stream: int, population: int, k: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """int64 tensor of ``k`` distinct indices in ``[0, population)``, in random order.

    Definition (so any implementation can reproduce it): if ``2k <= population`` the result is
    the first ``k`` distinct values of ``randint(key, stream, ., population)`` in order of first
    appearance; otherwise it is the first ``k`` entries of ``argsort`` of
    ``bits32(key, stream, population)`` with ties broken by index (a random permutation).
    """
    if not isinstance(population, int) or population < 0:
        raise ValueError(f"choice population must be a non-negative int, got {population!r}")
    if not isinstance(k, int) or not 0 <= k <= population:
        raise ValueError(f"choice k must be an int in [0, population={population}], got {k!r}")
    if population > 1 << 32:
        raise ValueError(f"choice population must be <= 2**32, got {population}")
    dev = _dev(device)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    if 2 * k > population:
        r = bits32(key, stream, population, device=dev)
        # stable sort on (value, index): value * 2**32 + index < 2**64 does not fit; sort the
        # 32-bit values stably instead, which breaks ties by index.
        return torch.sort(r, stable=True).indices[:k]
    m = k + k // 2 + 16
    while True:
        cand = randint(key, stream, m, population, device=dev)
        uniq, inv = torch.unique(cand, return_inverse=True)
        if uniq.numel() >= k:
            pos = torch.arange(m, dtype=torch.int64, device=dev)
            first = torch.full_like(uniq, m).scatter_reduce(0, inv, pos, reduce="amin")
            order = torch.argsort(first)[:k]
            return uniq[order]
        m *= 2


def _dev(device: torch.device | str | None) -> torch.device | None:
    return torch.device(device) if device is not None else None
