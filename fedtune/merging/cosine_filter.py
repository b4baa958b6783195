"""Direction filter: drop updates that point against the round's robust consensus.

Norm clipping bounds how far one client can move the model, not where: a sign-flipped update
clipped to the median norm still pulls with full honest strength in the wrong direction
(docs/benchmarks.md, section malicious). The filter scores each update by its cosine
similarity with a reference that the attackers cannot move far, the coordinate-wise median
of the round's updates (robust while fewer than half are malicious), and drops those below a
threshold (default 0: updates that oppose the consensus).

This is FLTrust's trust score ``ReLU(cos(g_i, g_0))`` (Cao et al., "FLTrust: Byzantine-robust
Federated Learning via Trust Bootstrapping", NDSS 2021, eq. 4) made binary, with the
coordinate-wise median standing in for the server's root-data update ``g_0`` that a fedtune
server does not have; paired with median-norm clipping it follows FLAME's filter-then-clip
order (Nguyen et al., USENIX Security 2022, Sec. 4), with a cosine threshold in place of its
HDBSCAN clustering. The price: an honest client whose data pull against everyone else's is
dropped too (the strategy logs each drop with its cosine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import Delta


class CosineFilter:
    """``outliers(deltas)`` lists ``(index, cosine)`` of the updates to drop this round."""

    def __init__(self, threshold: float = 0.0, min_clients: int = 3) -> None:
        t = float(threshold)
        if not -1.0 <= t <= 1.0:
            raise ValueError(f"cosine threshold must be in [-1, 1], got {threshold!r}")
        if not isinstance(min_clients, int) or min_clients < 3:
            raise ValueError(f"min_clients must be an int >= 3, got {min_clients!r}")
        self.threshold = t
        self.min_clients = min_clients

    def cosines(self, deltas: Sequence[Delta]) -> list[float]:
        """Cosine of every update with the coordinate-wise median of all of them (float64)."""
        names = list(deltas[0])
        dots = [0.0] * len(deltas)
        norms = [0.0] * len(deltas)
        ref_sq = 0.0
        for name in names:  # tensor by tensor: memory stays O(n x one tensor)
            stack = torch.stack([d[name].detach().reshape(-1).double() for d in deltas])
            ref = stack.median(dim=0).values  # lower median for even n: an actual value
            ref_sq += float(ref @ ref)
            for i in range(len(deltas)):
                dots[i] += float(stack[i] @ ref)
                norms[i] += float(stack[i] @ stack[i])
        ref_norm = math.sqrt(ref_sq)
        return [
            dots[i] / (math.sqrt(norms[i]) * ref_norm) if norms[i] > 0 and ref_norm > 0 else 0.0
            for i in range(len(deltas))
        ]

    def outliers(self, deltas: Sequence[Delta]) -> list[tuple[int, float]]:
        """Updates whose cosine is below the threshold; none if fewer than ``min_clients``
        updates (a median of two is their mean) or if the median itself is zero."""
        if len(deltas) < self.min_clients:
            return []
        cos = self.cosines(deltas)
        if all(c == 0.0 for c in cos):
            return []
        return [(i, c) for i, c in enumerate(cos) if c < self.threshold]

    def __repr__(self) -> str:
        return f"CosineFilter(threshold={self.threshold})"
