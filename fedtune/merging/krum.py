"""Krum and Multi-Krum.

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017, §4: with ``f`` Byzantine clients, client i's score is the sum of
squared L2 distances to its ``n − f − 2`` nearest other clients; Krum returns the delta
with the lowest score, Multi-Krum averages the ``m`` lowest-scoring ones.

As Flower's ``aggregate_krum``: the neighbour count is ``max(1, n − f − 2)``; Multi-Krum
takes the *weighted* mean (weights = number of examples) of the selected clients; Krum
ignores weights. Score ties go to the lower client index (a stable sort). Distances come
from a Gram matrix accumulated over coordinate chunks in float64 (memory O(n² + n·chunk)),
then a second pass averages the selected deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import BATCH_BUDGET, BatchMerger, Delta, FlatLayout, register


def krum_scores(layout: FlatLayout, deltas: Sequence[Delta], num_malicious: int) -> Tensor:
    """Krum score of every client (float64, shape ``(n,)``)."""
    n = len(deltas)
    chunk = max(1024, BATCH_BUDGET // n)
    flats = [layout.flat(d) for d in deltas]
    gram = torch.zeros(n, n, dtype=torch.float64, device=layout.device)
    for ti, s, e, _ in layout.spans(chunk):
        x = torch.stack([f[ti][s:e] for f in flats]).double()
        gram += x @ x.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0.0)
    dist.fill_diagonal_(float("inf"))  # a client is not its own neighbour
    k = max(1, n - num_malicious - 2)
    k = min(k, n - 1)
    return dist.sort(dim=1).values[:, :k].sum(dim=1)


class _KrumBase(BatchMerger):
    def __init__(self, num_malicious: int = 0) -> None:
        if int(num_malicious) != num_malicious or num_malicious < 0:
            raise ValueError(f"num_malicious must be an int >= 0, got {num_malicious!r}")
        self.num_malicious = int(num_malicious)

    def _select(self, layout: FlatLayout, deltas: Sequence[Delta], m: int) -> list[int]:
        n = len(deltas)
        if n < 2:
            return [0]
        scores = krum_scores(layout, deltas, self.num_malicious)
        return [int(i) for i in torch.sort(scores, stable=True).indices[:m]]

    def _mean(
        self, layout: FlatLayout, deltas: Sequence[Delta], weights: list[float], idx: list[int]
    ) -> Tensor:
        wsum = sum(weights[i] for i in idx)
        if wsum <= 0:
            raise ValueError("the clients selected by Krum all have weight 0")
        out = layout.zeros()
        for i in idx:
            for off, f in zip(layout.offsets, layout.flat(deltas[i]), strict=True):
                out[off : off + f.numel()].add_(f, alpha=weights[i] / wsum)
        return out


@register("krum")
class Krum(_KrumBase):
    """The single delta with the lowest Krum score (weights ignored)."""

    def _merge(
        self, layout: FlatLayout, deltas: Sequence[Delta], weights: list[float], key: int | None
    ) -> Tensor:
        (i,) = self._select(layout, deltas, 1)
        return self._mean(layout, deltas, [1.0] * len(deltas), [i])


@register("multi-krum")
class MultiKrum(_KrumBase):
    """Weighted mean of the ``to_keep`` lowest-score deltas (default ``n − num_malicious``)."""

    def __init__(self, num_malicious: int = 0, to_keep: int | None = None) -> None:
        super().__init__(num_malicious)
        if to_keep is not None and (int(to_keep) != to_keep or to_keep < 1):
            raise ValueError(f"to_keep must be an int >= 1, got {to_keep!r}")
        self.to_keep = None if to_keep is None else int(to_keep)

    def _merge(
        self, layout: FlatLayout, deltas: Sequence[Delta], weights: list[float], key: int | None
    ) -> Tensor:
        n = len(deltas)
        m = self.to_keep if self.to_keep is not None else max(1, n - self.num_malicious)
        idx = self._select(layout, deltas, min(m, n))
        return self._mean(layout, deltas, weights, idx)
