"""SecAgg+'s arithmetic: quantize to integers, sum modulo a field, dequantize.

Flower's SecAgg+ (Bell et al., CCS 2020; ``flwr.server.workflow.SecAggPlusWorkflow`` with the
client's ``secaggplus_mod``) lets the server learn only ``Σ_i q_i mod M``: each client adds
pairwise masks that cancel in the sum and a private mask the server removes with Shamir
shares of the survivors; masks of a dropped client are rebuilt from the shares of at least
``threshold`` others. Under Flower fedtune runs that protocol itself (fedtune/fl/secagg.py).
This module is the arithmetic that remains once the masks have cancelled, with Flower's
constants and formulas: client ``i`` with weight ``w_i`` sends

    r_i = round(w_i / w_max · T),  q_i = SR((clip(x_i · r_i/T, ±c) + c) · T / (2c))  (ints)

(``SR`` stochastic rounding, ``T = 2^22`` levels, ``M = 2^32``), plus ``r_i`` itself, and
the server turns ``Q = Σ q_i mod M``, ``R = Σ r_i`` into

    x̄ = (Q · 2c/T − c − (m−1)·c) · T / R       = Σ_i w_i x_i / Σ_i w_i  (to quantization)

``fedtune.simulate`` calls :func:`secure_mean` (no masks: they cancel exactly, so the integers
equal the masked protocol's, and with the same rounding draws so would the result); tests
check that Flower's masked protocol returns the same numbers for vectors on the grid.
Stochastic rounding here draws from :func:`fedtune.rng.uniform` with the client's key
(Flower's mod uses numpy's global generator; for secrecy its masks use the OS's).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedtune import rng

TARGET_RANGE = 1 << 22  # Flower's SecAggPlusWorkflow default quantization_range
MOD_RANGE = 1 << 32  # and modulus_range
_ROUND_TAG = 0x5EC_A66


def quantize(x: np.ndarray, clip: float, key: int, target: int = TARGET_RANGE) -> np.ndarray:
    """Flower's ``quantize`` with keyed stochastic rounding: ints in ``[0, target]``."""
    pre = (np.clip(x, -clip, clip) + clip) * (target / (2 * clip))
    up = np.ceil(pre).astype(np.int64)
    u = rng.uniform(rng.derive_key(key, _ROUND_TAG), 0, pre.size).numpy().astype(np.float64)
    up[u < (up - pre)] -= 1
    return up


def weight_ratio(w: float, max_weight: float, target: int = TARGET_RANGE) -> int:
    return round(w / max_weight * target)


def client_vector(
    x: np.ndarray, w: float, *, clip: float, max_weight: float, key: int, target: int = TARGET_RANGE
) -> tuple[int, np.ndarray]:
    """``(r_i, q_i)``: what client ``i`` puts into the masked sum (before masking)."""
    r = weight_ratio(w, max_weight, target)
    return r, quantize(np.asarray(x, dtype=np.float64) * (r / target), clip, key, target)


def modular_sum(rows: Sequence[np.ndarray], mod: int = MOD_RANGE) -> np.ndarray:
    out = np.zeros_like(rows[0], dtype=np.int64)
    for r in rows:
        out = (out + r) % mod
    return out


def dequantize_sum(
    q_sum: np.ndarray, r_sum: int, m: int, clip: float, target: int = TARGET_RANGE
) -> np.ndarray:
    """Flower's unmask-stage formula, in its order of float operations."""
    vec = q_sum.astype(float) * ((2 * clip) / target) + (-clip)
    vec += -(m - 1) * clip
    vec *= target / r_sum
    return vec


def secure_mean(
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    clip: float,
    max_weight: float,
    keys: Sequence[int],
) -> torch.Tensor:
    """``Σ w_i x_i / Σ w_i`` as SecAgg+ computes it (quantized, summed mod 2^32)."""
    if not vectors:
        raise ValueError("a secure sum needs at least one client")
    rs, qs = [], []
    for x, w, k in zip(vectors, weights, keys, strict=True):
        r, q = client_vector(x.double().numpy(), w, clip=clip, max_weight=max_weight, key=k)
        rs.append(r)
        qs.append(q)
    q_sum = modular_sum(qs)
    r_sum = sum(rs) % MOD_RANGE
    return torch.from_numpy(dequantize_sum(q_sum, r_sum, len(qs), clip)).to(torch.float32)
