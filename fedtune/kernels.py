"""Compiled CPU kernels (numba) for the hot loops of the seed-projection codecs.

Why: on CPU the portable Philox stream (:mod:`fedtune.rng`) ran as ~100 numpy passes over
uint64 arrays, and the codecs then made several more int64 / float64 passes per element
(hash, sign, bucket, norm), so countsketch cost ~26x and srht ~46x a plain copy of the
update (issue 4 asks for 20x). Here the Philox rounds run in registers and are fused with
what consumes them: countsketch encodes and decodes without ever materialising its hash, the
SRHT sign flip reads its bit straight from the Philox word, and the Walsh–Hadamard butterflies
run in place on each cache-resident row.

Exactness: everything here is integer arithmetic plus the same IEEE float32 ``+ - *`` the
reference paths perform on the same operands in the same order (no FMA can form: there is
no multiply feeding an add in any butterfly, and numba does not reassociate without
``fastmath``). Hence the outputs equal the numpy/torch paths bit for bit (tested) and the
decoders stay bit-identical to the CUDA path.

numba is an ordinary dependency, but the library keeps working without it (``AVAILABLE`` is
False and the numpy/torch paths run); ``FEDTUNE_NUMBA=0`` forces that fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np

try:  # pragma: no cover - exercised by whichever environment runs the tests
    if os.environ.get("FEDTUNE_NUMBA", "1") == "0":
        raise ImportError("disabled by FEDTUNE_NUMBA=0")
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover
    AVAILABLE = False

F = TypeVar("F", bound=Callable[..., Any])


def njit(**options: Any) -> Callable[[F], F]:
    """``numba.njit(**options)`` keeping the function's type; identity without numba."""
    if not AVAILABLE:
        return lambda f: f
    return cast(Callable[[F], F], numba.njit(**options))


MASK32 = 0xFFFFFFFF
_U = np.uint64
_M0, _M1 = _U(0xD2511F53), _U(0xCD9E8D57)  # Philox4x32 multipliers (as in fedtune.rng)
_W0, _W1 = _U(0x9E3779B9), _U(0xBB67AE85)
_MASK, _S32, _S31, _ONE = _U(MASK32), _U(32), _U(31), _U(1)
# sign from one bit as a table lookup: a branch on a random bit mispredicts half the time
_SIGN = np.array([1.0, -1.0], dtype=np.float32)
# _FLIP[b, t]: the float32 sign-bit mask for bit t of byte b (8 signs per lookup row)
_FLIP = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.uint32) << np.uint32(31)


def key_words(key: int, stream: int, tag: int) -> np.ndarray:
    """The kernels' Philox key and constant counter words ``[k0, k1, tag << 24, s0, s1]``.

    Python ints above 2**63 would be typed int64 by numba, so they travel as uint64 words.
    """
    return np.array(
        [key & MASK32, key >> 32, tag << 24, stream & MASK32, stream >> 32], dtype=np.uint64
    )


@njit(inline="always")
def _philox(
    b: int, kw: np.ndarray
) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64]:  # pragma: no cover - compiled
    """Philox4x32-10 of counter ``(b lo, b hi | tag, s0, s1)``: the same rounds as rng.py."""
    ub = _U(b)
    k0, k1 = kw[0], kw[1]
    c0, c1, c2, c3 = ub & _MASK, (ub >> _S32) | kw[2], kw[3], kw[4]
    for _ in range(10):
        p = c0 * _M0
        q = c2 * _M1
        c0, c1, c2, c3 = (q >> _S32) ^ c1 ^ k0, q & _MASK, (p >> _S32) ^ c3 ^ k1, p & _MASK
        k0 = (k0 + _W0) & _MASK
        k1 = (k1 + _W1) & _MASK
    return c0, c1, c2, c3


@njit(inline="always")
def _fill(
    w: np.ndarray, first: int, count: int, kw: np.ndarray
) -> None:  # pragma: no cover - compiled
    """``w[4j : 4j+4] = Philox(block first + j)`` for j < count (w flat uint64).

    Kept as its own loop so LLVM vectorises the rounds (vpmuludq: 32x32->64-bit lanes),
    ~2.5x faster than one block at a time inside a consumer's loop.
    """
    for j in range(count):
        c0, c1, c2, c3 = _philox(first + j, kw)
        w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3] = c0, c1, c2, c3


_CHUNK = 512  # Philox blocks per batch in the fused kernels (16 KiB of words: stays in L1)


@njit(cache=True, nogil=True)
def philox_blocks(
    kw: np.ndarray,
    first: int,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """``out[j] = Philox(block first + j)`` for a C-contiguous (n, 4) uint64 array."""
    _fill(out.reshape(-1), first, out.shape[0], kw)


@njit(cache=True, nogil=True)
def countsketch(x: np.ndarray, y: np.ndarray, kw: np.ndarray, decode: bool) -> None:
    """Count-sketch with hash word i (sign = bit 0, bucket h = ((w >> 1) K) >> 31).

    Encode: ``y[h(i)] += s_i x_i`` in index order. Decode: ``x[i] = s_i y[h(i)]`` (a gather
    and an exact sign flip). The two are adjoint; they share the hashing loop.
    """
    d, kk = x.shape[0], _U(y.shape[0])
    w = np.empty(4 * _CHUNK, dtype=np.uint64)
    for start in range(0, d, 4 * _CHUNK):
        m = min(4 * _CHUNK, d - start)
        _fill(w, start // 4, (m + 3) // 4, kw)
        if decode:
            for i in range(m):
                wi = w[i]
                x[start + i] = _SIGN[wi & _ONE] * y[((wi >> _ONE) * kk) >> _S31]
        else:
            for i in range(m):
                wi = w[i]
                y[((wi >> _ONE) * kk) >> _S31] += _SIGN[wi & _ONE] * x[start + i]


@njit(cache=True, nogil=True)
def sign_flip(
    x: np.ndarray,
    out: np.ndarray,
    scale: np.float32,
    kw: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """``out[i] = (x[i] * r_i) * scale`` with ``r_i`` = Rademacher element i of rng.py.

    Element i is bit ``i % 32`` of sign-word ``i // 32`` (bit set: -1), and sign-word j is word
    ``j % 4`` of Philox block ``j // 4``: one Philox call gives 128 signs. The sign is applied
    by flipping the float's sign bit (what ``* -1.0`` does to every non-NaN value), which
    vectorises (8 masks per byte of sign bits from a 256-row table). ``out`` may be ``x``.
    """
    d = x.shape[0]
    xu, ou = x.view(np.uint32), out.view(np.uint32)
    w = np.empty(4 * _CHUNK, dtype=np.uint64)
    per = 128 * _CHUNK  # elements per batch of Philox blocks
    scaled = scale != np.float32(1.0)
    for start in range(0, d, per):
        m = min(per, d - start)
        _fill(w, start // 128, (m + 127) // 128, kw)
        for q in range(m // 8):  # byte q of the sign bits flips elements 8q .. 8q+7
            byte = (w[q // 4] >> _U(8 * (q % 4))) & _U(0xFF)
            base = start + 8 * q
            for t in range(8):
                ou[base + t] = xu[base + t] ^ _FLIP[byte, t]
        for i in range(m - m % 8, m):
            bit = (w[i // 32] >> _U(i % 32)) & _ONE
            ou[start + i] = xu[start + i] ^ (np.uint32(bit) << np.uint32(31))
    if scaled:  # (x r) s == r (x s) bit for bit: rounding to nearest is symmetric
        for i in range(d):
            out[i] = out[i] * scale


@njit(cache=True, nogil=True)
def fwht_rows(z: np.ndarray) -> None:  # pragma: no cover - compiled
    """In-place unnormalised Walsh–Hadamard transform of every row of a 2-D float32 array.

    The radix-2 butterflies ``(a, b) -> (a + b, a - b)`` of srht.fwht, with the same
    operands and roundings, grouped for speed: stages h = 1, 2, 4 on 8 values held in
    registers, then two stages per pass (radix 4: ``((a+b)+(c+d), (a-b)+(c-d), (a+b)-(c+d),
    (a-b)-(c-d))`` is exactly what two radix-2 stages compute). The grouping changes no value.
    """
    n = z.shape[1]
    for r in range(z.shape[0]):
        row = z[r]
        h = 1
        if n >= 8:
            for g in range(0, n, 8):
                x0, x1, x2, x3 = row[g], row[g + 1], row[g + 2], row[g + 3]
                x4, x5, x6, x7 = row[g + 4], row[g + 5], row[g + 6], row[g + 7]
                x0, x1, x2, x3, x4, x5, x6, x7 = (
                    x0 + x1,
                    x0 - x1,
                    x2 + x3,
                    x2 - x3,
                    x4 + x5,
                    x4 - x5,
                    x6 + x7,
                    x6 - x7,
                )
                x0, x1, x2, x3, x4, x5, x6, x7 = (
                    x0 + x2,
                    x1 + x3,
                    x0 - x2,
                    x1 - x3,
                    x4 + x6,
                    x5 + x7,
                    x4 - x6,
                    x5 - x7,
                )
                row[g], row[g + 1], row[g + 2], row[g + 3] = x0 + x4, x1 + x5, x2 + x6, x3 + x7
                row[g + 4], row[g + 5], row[g + 6], row[g + 7] = x0 - x4, x1 - x5, x2 - x6, x3 - x7
            h = 8
        # the later stages act on four (or two) equal, disjoint slices; as slices indexed by
        # the loop counter LLVM vectorises them (plain row[j + h] indexing it does not)
        while 4 * h <= n:
            for i in range(0, n, 4 * h):
                a, b = row[i : i + h], row[i + h : i + 2 * h]
                c, d = row[i + 2 * h : i + 3 * h], row[i + 3 * h : i + 4 * h]
                for j in range(h):
                    x0, x1, x2, x3 = a[j], b[j], c[j], d[j]
                    s1, d1, s2, d2 = x0 + x1, x0 - x1, x2 + x3, x2 - x3
                    a[j], b[j], c[j], d[j] = s1 + s2, d1 + d2, s1 - s2, d1 - d2
            h *= 4
        while h < n:
            for i in range(0, n, 2 * h):
                a, b = row[i : i + h], row[i + h : i + 2 * h]
                for j in range(h):
                    x0, x1 = a[j], b[j]
                    a[j], b[j] = x0 + x1, x0 - x1
            h *= 2


@njit(cache=True, nogil=True)
def first_distinct(
    population: int,
    k: int,
    kw: np.ndarray,
) -> np.ndarray:  # pragma: no cover - compiled
    """The first ``k`` distinct values of ``rng.randint(key, stream, ., population)``.

    Element i is ``((w_i >> 1) population) >> 31``; the caller ensures ``2k <= population``
    so the expected number of draws is below ``1.39 k``.
    """
    seen = np.zeros(population, dtype=np.bool_)
    out = np.empty(k, dtype=np.int64)
    pop, got, b = _U(population), 0, 0
    while got < k:
        w = _philox(b, kw)
        for j in range(4):
            v = ((w[j] >> _ONE) * pop) >> _S31
            if not seen[v] and got < k:
                seen[v] = True
                out[got] = v
                got += 1
        b += 1
    return out


@njit(cache=True, nogil=True)
def quantize_int8(
    y: np.ndarray,
    scale: np.float32,
    kw: np.ndarray,
) -> np.ndarray:  # pragma: no cover - compiled
    """``clamp(floor(y / scale + u), -127, 127)`` as int8, ``u_i = rng.uniform(key, stream)[i]``.

    The float32 operations of fedtune.codecs.quantize's torch expression, in its order.
    """
    n = y.shape[0]
    q = np.empty(n, dtype=np.int8)
    w = np.empty(4 * _CHUNK, dtype=np.uint64)
    inv24 = np.float32(2.0**-24)
    for start in range(0, n, 4 * _CHUNK):
        m = min(4 * _CHUNK, n - start)
        _fill(w, start // 4, (m + 3) // 4, kw)
        for i in range(m):
            u = np.float32(w[i] >> _U(8)) * inv24  # exact: 24 bits times a power of two
            v = np.floor(y[start + i] / scale + u)
            q[start + i] = np.int8(min(max(v, np.float32(-127.0)), np.float32(127.0)))
    return q


@njit(cache=True, nogil=True)
def sum_squares(x: np.ndarray) -> float:  # pragma: no cover - compiled
    """``Σ x_i²`` in float64 without a float64 copy of ``x``; NaN/Inf propagate.

    Eight partial sums break the add-latency chain (a fixed order: the result is
    deterministic). For float32 input it cannot overflow, so it is finite iff every x_i is.
    """
    n = x.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    m = n - n % 8
    for i in range(0, m, 8):
        v0, v1, v2, v3 = (
            np.float64(x[i]),
            np.float64(x[i + 1]),
            np.float64(x[i + 2]),
            np.float64(x[i + 3]),
        )
        v4, v5, v6, v7 = (
            np.float64(x[i + 4]),
            np.float64(x[i + 5]),
            np.float64(x[i + 6]),
            np.float64(x[i + 7]),
        )
        a0, a1, a2, a3 = a0 + v0 * v0, a1 + v1 * v1, a2 + v2 * v2, a3 + v3 * v3
        a4, a5, a6, a7 = a4 + v4 * v4, a5 + v5 * v5, a6 + v6 * v6, a7 + v7 * v7
    total = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    for i in range(m, n):
        v = np.float64(x[i])
        total += v * v
    return total
