"""Direction filter: drop updates that point against the other clients' robust consensus.

Norm clipping bounds how far one client can move the model, not where: a sign-flipped update
clipped to the median norm still pulls with full honest strength in the wrong direction
(docs/benchmarks.md, section malicious). The filter scores each update by its cosine with a
consensus the attackers cannot move far, and drops the updates that oppose it.

Score of client i: the cosine of its unit-normalised update with the coordinate-wise median of
the *other* clients' unit-normalised updates. Both details matter on real LoRA updates, whose
directions are nearly orthogonal (pairwise cosines 0.0-0.3 on the default federation):
with i's own update in the median, its self-influence (~0.2) outweighs the consensus (~0.1),
and a 100x-scaled attacker sits at the extreme of every coordinate and shifts the median
towards itself by a rank; leaving i out and normalising removes both (measured on round-1
updates: flipped attackers -0.17, honest clients -0.02..0.26).

An update is dropped when its score is below ``threshold`` (default 0: it opposes the
consensus) **and** is a low outlier among the round's scores (below ``median - k * 1.4826 *
MAD``, default k = 3), so an honest client whose data merely pull a little against the
others' is kept. This is FLTrust's trust score ``ReLU(cos(g_i, g_0))`` (Cao et al., NDSS 2021,
eq. 4) made binary, with the others' median standing in for the server's root-data update
``g_0`` that a fedtune server does not have; with median-norm clipping after it, it follows
FLAME's filter-then-clip order (Nguyen et al., USENIX Security 2022, Sec. 4), with a robust
outlier rule in place of its HDBSCAN clustering.

``memory=True`` decides on each client's *mean* score over all rounds it took part in, as
FoolsGold judges clients by their history rather than one update (Fung et al., "The Limitations
of Federated Learning in Sybil Settings", RAID 2020, Sec. 4). Why: once the model has learned
what the clients share, their updates are nearly orthogonal (pairwise cosines 0.0-0.1 after 5
rounds on the default federation) and one round's scores no longer separate a flipped update
from an honest one (measured: attackers -0.04 / -0.08, honest -0.03..0.05), while a persistent
attacker's mean stays far below the honest clients'. The history is part of the checkpoint.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from .base import Delta


class CosineFilter:
    """``outliers(deltas)`` lists ``(index, score)`` of the updates to drop this round."""

    def __init__(
        self, threshold: float = 0.0, k: float = 3.0, min_clients: int = 4, memory: bool = False
    ) -> None:
        t = float(threshold)
        if not -1.0 <= t <= 1.0:
            raise ValueError(f"cosine threshold must be in [-1, 1], got {threshold!r}")
        if not (float(k) >= 0 and math.isfinite(k)):
            raise ValueError(f"outlier factor k must be a finite number >= 0, got {k!r}")
        if not isinstance(min_clients, int) or min_clients < 4:
            raise ValueError(f"min_clients must be an int >= 4, got {min_clients!r}")
        self.threshold = t
        self.k = float(k)
        self.min_clients = min_clients
        self.memory = memory
        self.history: dict[int, tuple[float, int]] = {}  # slot -> (sum of scores, rounds)
        self.last_scores: list[float] = []  # the scores the last decision used, for the log

    def scores(self, deltas: Sequence[Delta]) -> list[float]:
        """Per client: cosine of its unit update with the others' coordinate-wise median.

        One sort per tensor gives every leave-one-out median: without client i the lower
        median of the other n - 1 values is the sorted value at position ``m = (n - 2) // 2``
        if i ranks above it, else the one at ``m + 1``. Zero updates score 0.
        """
        n = len(deltas)
        norms = [
            math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in d.values()))
            for d in deltas
        ]
        inv = torch.tensor([1.0 / x if x > 0 else 0.0 for x in norms], dtype=torch.float64)
        dots, med_sq = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        m = (n - 2) // 2
        for name in deltas[0]:  # tensor by tensor: memory stays O(n x one tensor)
            u = torch.stack([d[name].detach().reshape(-1).double() for d in deltas])
            u *= inv[:, None]
            srt, order = u.sort(dim=0)
            rank = torch.empty_like(order)
            rank.scatter_(0, order, torch.arange(n).unsqueeze(1).expand_as(order).contiguous())
            lo, hi = srt[m], srt[m + 1]
            for i in range(n):
                med = torch.where(rank[i] > m, lo, hi)
                dots[i] += u[i] @ med
                med_sq[i] += med @ med
        return [
            float(dots[i] / math.sqrt(med_sq[i])) if norms[i] > 0 and med_sq[i] > 0 else 0.0
            for i in range(n)
        ]

    def outliers(
        self, deltas: Sequence[Delta], slots: Sequence[int] | None = None
    ) -> list[tuple[int, float]]:
        """Updates whose score is below the threshold and below ``median - k * 1.4826 * MAD``;
        none with fewer than ``min_clients`` updates (too few for a consensus).

        With ``memory`` the score is the client's mean over its rounds (``slots`` name the
        clients; this round's scores are added to the history first).
        """
        self.last_scores = []
        if len(deltas) < self.min_clients:
            return []
        sc = self.scores(deltas)
        if self.memory:
            if slots is None or len(slots) != len(deltas):
                raise ValueError("a filter with memory needs one slot per update")
            for slot, x in zip(slots, sc, strict=True):
                total, count = self.history.get(int(slot), (0.0, 0))
                self.history[int(slot)] = (total + x, count + 1)
            sc = [self.history[int(s)][0] / self.history[int(s)][1] for s in slots]
        self.last_scores = sc
        med = statistics.median(sc)
        spread = 1.4826 * statistics.median(abs(x - med) for x in sc)
        cut = min(self.threshold, med - self.k * spread)
        return [(i, x) for i, x in enumerate(sc) if x < cut]

    def state_dict(self) -> dict[str, list[float]]:
        """The history as JSON-able data: slot -> [sum of scores, rounds] (exact floats)."""
        return {str(k): [t, float(c)] for k, (t, c) in sorted(self.history.items())}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.history = {int(k): (float(v[0]), int(v[1])) for k, v in state.items()}

    def __repr__(self) -> str:
        return f"CosineFilter(threshold={self.threshold}, k={self.k}, memory={self.memory})"
