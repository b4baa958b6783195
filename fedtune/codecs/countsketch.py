"""``countsketch``: hash each coordinate to one of K_l buckets with a random sign, O(d).

Count-sketch (Charikar, Chen, Farach-Colton 2002; used for FL updates by FetchSGD, Rothchild
et al. 2020): ``y_b = Σ_{i: h(i)=b} s_i x_i`` and ``x̂_i = s_i y_{h(i)}``. Unbiased since
``E[s_i s_j] = 0`` for ``i ≠ j``; exact MSE ``(d−1)/K ‖Δ‖²`` with a uniform hash (research
note §4), the same as a dense Rademacher basis at O(d) instead of O(K·d).

Coordinate i of block l uses word ``w = rng.bits32(key, l, .)[i]``: sign from bit 0, bucket
``((w >> 1)·K) >> 31``. Decoding is a gather and a sign flip, so decoded values are
bit-identical on every device. On CPU with numba the hash is never materialised: the
Philox words feed the accumulation (encode) or the gather (decode) directly
(:mod:`fedtune.kernels`), with the same values as the torch path below (tested).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from fedtune import kernels, rng
from fedtune.codecs.projection import ProjectionCodec
from fedtune.codecs.registry import register


def _hash(
    key: int, block: int, d: int, k: int, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    w = rng.bits32(key, block, d, device=device)
    sign = (1 - 2 * (w & 1)).to(torch.float32)
    bucket = ((w >> 1) * k) >> 31
    return bucket, sign


@register("countsketch")
@dataclasses.dataclass
class CountSketchCodec(ProjectionCodec):
    """Signed hashing into K_l buckets per block."""

    replayable: ClassVar[bool] = True  # decoding is a signed gather, no sums
    name = "countsketch"

    def project(self, x: torch.Tensor, k: int, key: int, block: int) -> torch.Tensor:
        if kernels.AVAILABLE and x.device.type == "cpu":
            y = np.zeros(k, dtype=np.float32)
            xs = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
            kernels.countsketch(xs, y, kernels.key_words(key, block, rng.TAG_BITS), False)
            return torch.from_numpy(y)
        bucket, sign = _hash(key, block, x.numel(), k, x.device)
        return torch.zeros(k, dtype=torch.float32, device=x.device).index_add_(0, bucket, sign * x)

    def reconstruct(
        self, y: torch.Tensor, d: int, key: int, block: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if kernels.AVAILABLE:
            dest = out if out is not None else torch.empty(d, dtype=torch.float32)
            ys = np.ascontiguousarray(y.detach().cpu().numpy(), dtype=np.float32)
            words = kernels.key_words(key, block, rng.TAG_BITS)
            kernels.countsketch(dest.numpy(), ys, words, True)
            return dest
        bucket, sign = _hash(key, block, d, y.numel(), None)
        return sign * y.index_select(0, bucket)  # ~200x faster than y[bucket]

    def omega(self, d: int, k: int) -> float:
        return (d - 1) / k

    def coef_std(self, d: int, k: int) -> float:
        return (1.0 / k) ** 0.5
