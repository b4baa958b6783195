"""Coefficient quantizers: fp32, fp16, int8 (per-block scale, stochastic rounding), 1-bit sign.

Rate–distortion view (research note §4): with seeds free, bits are the cost, so fewer bits
per coefficient and more coefficients is usually better. int8 with a per-block max scale and
stochastic rounding is unbiased and adds a relative variance of ~1e-4 per coefficient;
fp16 is stored relative to the block's max |y| so it cannot overflow; ``sign1`` sends one
bit per coefficient and a per-block magnitude chosen by the codec (see
``ProjectionCodec``), as in 1-bit sketches (DRIVE/EDEN, arXiv 2105.08339).
"""

from __future__ import annotations

import numpy as np
import torch

from fedtune import kernels, rng
from fedtune.codecs.base import PayloadError
from fedtune.codecs.wire import COEF_FP16, COEF_FP32, COEF_INT8, COEF_NAMES, COEF_SIGN1

BITS_TO_COEF = {32: COEF_FP32, 16: COEF_FP16, 8: COEF_INT8, 1: COEF_SIGN1}
_SR_DOMAIN = 0x5352  # separates the stochastic-rounding key from the basis key


def coef_from_bits(bits: int, allowed: tuple[int, ...] = (32, 16, 8, 1)) -> int:
    if bits not in allowed:
        raise ValueError(f"coef_bits must be one of {', '.join(map(str, allowed))}, got {bits!r}")
    return BITS_TO_COEF[bits]


def nbytes(coef: int, k: int) -> int:
    """Bytes that ``k`` coefficients take on the wire."""
    if coef == COEF_FP32:
        return 4 * k
    if coef == COEF_FP16:
        return 2 * k
    if coef == COEF_INT8:
        return k
    if coef == COEF_SIGN1:
        return (k + 7) // 8
    raise ValueError(f"unknown coefficient dtype id {coef}")


def rounding_key(key: int) -> int:
    return rng.derive_key(key, _SR_DOMAIN)


def quantize(
    y: torch.Tensor, coef: int, *, key: int, stream: int, sign_scale: float = 0.0
) -> tuple[bytes, float]:
    """Encode float32 coefficients ``y``; returns (bytes, per-block scale).

    int8: ``q = floor(y/s + u)`` with ``s = max|y|/127`` and ``u ~ U[0,1)`` from the portable
    RNG keyed by ``(rounding_key(key), stream)``, so ``E[q s] = y`` (unbiased).
    sign1: bit = (y < 0); the decoder returns ``±sign_scale``.
    """
    y = y.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    if coef == COEF_FP32:
        return y.numpy().astype("<f4").tobytes(), 1.0
    amax = float(y.abs().max()) if y.numel() else 0.0
    if coef == COEF_FP16:
        scale = amax if amax > 0 else 1.0
        return (y / scale).to(torch.float16).numpy().astype("<f2").tobytes(), scale
    if coef == COEF_INT8:
        scale = amax / 127.0 if amax > 0 else 0.0
        if scale == 0.0:
            return bytes(y.numel()), 0.0
        if kernels.AVAILABLE:  # one fused pass, same values (tests/test_kernels.py)
            words = kernels.key_words(rounding_key(key), stream, rng.TAG_BITS)
            qn = kernels.quantize_int8(y.numpy(), np.float32(scale), words)
            return qn.tobytes(), scale
        u = rng.uniform(rounding_key(key), stream, y.numel())
        q = torch.floor(y / scale + u).clamp_(-127, 127).to(torch.int8)
        return q.numpy().tobytes(), scale
    if coef == COEF_SIGN1:
        bits = (y < 0).numpy().astype(np.uint8)
        return np.packbits(bits, bitorder="little").tobytes(), float(sign_scale)
    raise ValueError(f"unknown coefficient dtype id {coef}")


def dequantize(buf: memoryview | bytes, k: int, coef: int, scale: float) -> torch.Tensor:
    """Inverse of :func:`quantize`: float32 CPU tensor of ``k`` values (checked finite)."""
    if len(buf) != nbytes(coef, k):
        raise PayloadError(f"coefficient block has {len(buf)} bytes, expected {nbytes(coef, k)}")
    if coef == COEF_FP32:
        arr = np.frombuffer(buf, dtype="<f4").astype(np.float32)
    elif coef == COEF_FP16:
        arr = np.frombuffer(buf, dtype="<f2").astype(np.float32) * np.float32(scale)
    elif coef == COEF_INT8:
        q = np.frombuffer(buf, dtype=np.int8)
        if (q == -128).any():
            raise PayloadError("int8 coefficient -128 is outside the encoder's range [-127, 127]")
        arr = q.astype(np.float32) * np.float32(scale)
    elif coef == COEF_SIGN1:
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
        if bits[k:].any():
            raise PayloadError("sign coefficients have non-zero padding bits")
        arr = (1.0 - 2.0 * bits[:k].astype(np.float32)) * np.float32(scale)
    else:
        raise PayloadError(f"unknown coefficient dtype {COEF_NAMES.get(coef, coef)}")
    if not np.isfinite(arr).all():
        raise PayloadError("non-finite coefficient in payload")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
