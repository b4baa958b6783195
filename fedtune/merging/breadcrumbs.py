"""Model Breadcrumbs: drop the outliers and the small entries of each row.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", ECCV 2024, §3; official ``rezazzr/breadcrumbs src/task_vectors.py``
(``TaskVectorMiddleKeep``). Per row (last dimension) of every tensor of a client's delta,
with ``c`` entries: remove the ``floor(gamma·c)`` largest magnitudes (outliers), then keep
the next ``floor(density·c)`` largest; zero the rest. 0-d tensors are kept as they are,
1-d tensors are one row. Defaults are the official search's starting point
(``gamma=0.006``, ``density`` = its ``beta`` = 0.15).

Then ``merge="linear"``: ``scale · Σ w_i τ̃_i / Σ w_i`` (deviation: the paper sums with
unit weights and α; the mean keeps scale = 1 at FedAvg magnitude), or ``merge="ties"``:
elect + disjoint mean as in :mod:`.ties` (mergekit's ``breadcrumbs_ties``).

If ``floor(gamma·c) + floor(density·c) > c`` fewer outliers are removed (as mergekit);
unlike mergekit, ``floor(gamma·c) = 0`` removes nothing instead of zeroing the tensor
(mergekit bug noted in the research note). Streaming: per-client masks, O(d) state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .base import Delta, FlatLayout, StreamingMerger, check_choice, check_range, register
from .sparsify import SignedAccumulator, chunk_size


def breadcrumbs_rows(x: Tensor, density: float, gamma: float) -> Tensor:
    """Apply the breadcrumbs mask to every row of ``x`` (shape ``(rows, c)``)."""
    c = x.shape[-1]
    k = math.floor(density * c * (1 + 1e-12))
    n_top = math.floor(gamma * c * (1 + 1e-12))
    n_top = min(n_top, c - k)
    if k == 0:
        return torch.zeros_like(x)
    idx = torch.topk(x.abs(), n_top + k, dim=-1, sorted=True).indices[:, n_top:]
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
    return torch.where(mask, x, 0.0)


def breadcrumbs_pieces(
    layout: FlatLayout, delta: Delta, density: float, gamma: float
) -> Iterator[tuple[int, Tensor]]:
    """``(flat_offset, masked_chunk)`` of one client's delta; chunks are whole rows."""
    for name, off in zip(layout.names, layout.offsets, strict=True):
        t = delta[name]
        if t.dim() == 0:
            yield off, t.reshape(1)
            continue
        rows = t.reshape(-1, t.shape[-1])
        c = rows.shape[1]
        step = max(1, chunk_size(layout.total, layout.device) // max(c, 1))
        for r in range(0, rows.shape[0], step):
            block = rows[r : r + step]
            yield off + r * c, breadcrumbs_rows(block, density, gamma).reshape(-1)


@register("breadcrumbs")
class Breadcrumbs(StreamingMerger):
    """Breadcrumbs masks per client, then a weighted mean or a TIES merge."""

    def __init__(
        self, density: float = 0.15, gamma: float = 0.006, merge: str = "linear", scale: float = 1.0
    ) -> None:
        super().__init__()
        self.density = check_range("density", density, 0.0, 1.0, lo_open=True)
        self.gamma = check_range("gamma", gamma, 0.0, 1.0, hi_open=True)
        check_choice("merge", merge, ("linear", "ties"))
        self.mode = merge
        self.scale = check_range("scale", scale, -1e6, 1e6)
        self._sum: Tensor | None = None
        self._acc: SignedAccumulator | None = None

    def _reset_state(self) -> None:
        self._sum = None
        self._acc = None

    def _begin(self, layout: FlatLayout) -> None:
        if self.mode == "linear":
            self._sum = layout.zeros()
        else:
            self._acc = SignedAccumulator(layout.total, layout.device)

    def _add(self, layout: FlatLayout, delta: Delta, weight: float, key: int | None) -> None:
        for off, x in breadcrumbs_pieces(layout, delta, self.density, self.gamma):
            if self._sum is not None:
                self._sum[off : off + x.numel()].add_(x, alpha=weight)
            else:
                assert self._acc is not None
                self._acc.add(off, x, weight)

    def _finish(self, layout: FlatLayout) -> Tensor:
        if self._sum is not None:
            return self._sum.mul_(self.scale / self._weight_sum)
        assert self._acc is not None
        return self._acc.finish().mul_(self.scale)
