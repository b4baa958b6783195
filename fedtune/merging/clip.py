"""Norm clipping: a robust pre-step that composes with every merger.

Each client's delta is scaled by ``min(1, C / ‖τ_i‖₂)``, the norm taken over the whole
adapter (all tensors as one vector). This is the clipping of DP-FedAvg (McMahan et al.,
"Learning Differentially Private Recurrent Language Models", ICLR 2018, Alg. 1
``ClipFn``) and of Flower's fixed-clipping wrappers, without the noise. It bounds the
influence of any single client (Sun et al., "Can You Really Backdoor Federated
Learning?", 2019, norm-difference clipping).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Delta


class NormClip:
    """``clip(delta)`` returns a new dict whose whole-adapter L2 norm is at most ``max_norm``."""

    def __init__(self, max_norm: float) -> None:
        m = float(max_norm)
        if not (m > 0 and math.isfinite(m)):
            raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
        self.max_norm = m

    @staticmethod
    def norm(delta: Delta) -> float:
        """Whole-adapter L2 norm, accumulated in float64."""
        sq = sum(
            float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2
            for t in delta.values()
        )
        return math.sqrt(sq)

    def factor(self, delta: Delta) -> float:
        """The scale ``min(1, C / ‖delta‖)`` this clip applies (1.0 for a zero delta)."""
        n = self.norm(delta)
        if not math.isfinite(n):
            raise ValueError("cannot clip a delta that contains NaN or Inf")
        return 1.0 if n <= self.max_norm else self.max_norm / n

    def __call__(self, delta: Delta) -> dict[str, Tensor]:
        f = self.factor(delta)
        if f == 1.0:
            return dict(delta)
        return {k: t * f for k, t in delta.items()}

    def __repr__(self) -> str:
        return f"NormClip(max_norm={self.max_norm})"
