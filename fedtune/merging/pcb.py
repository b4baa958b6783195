"""PCB-Merging: parameter competition balancing.

Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024, §3. This
follows the released code (``duguodong7/pcb-merging``, ``pcb-merging.py::PCB_merge``),
whose every statistic is global per task (the whole flattened delta):

1. clamp ``|τ_i|`` to its own order statistics ``[s_i[⌊d q⌋], s_i[⌊d(1−q)⌋ − 1]]``
   (``s_i`` = sorted ``|τ_i|``, 0-based; ``q = 1e-4``); ``τ̄_i = sign(τ_i) · clamped``;
2. intra-balancing ``exp(n · minmax(clamped |τ_i|)²)``;
3. inter-balancing ``tanh(τ_i ⊙ Σ_j τ_j)`` (on the unclamped deltas);
4. ``β_i`` = product; raise every value below ``b_i[⌊d(1−r)⌋]`` (sorted ``β_i``) to it and
   min-max normalise, so only the top ``r`` fraction gets a positive score ``s_i``;
5. ``τ_m = Σ_i s_i τ̄_i / max(Σ_i s_i, 1e-12)``, times ``scale`` (λ).

Deviations: client weights (the paper has none) enter as ``w̃_i = w_i / mean(w)`` in the
inter term's sum and as ``w̃_i s_i`` in the final weighted mean (equal weights = reference);
a min-max over a constant vector (0/0 in the reference) is taken as 0. The reference sorts
the n×d matrix; here order statistics come from the chunked radix select
(:func:`.sparsify.kth_smallest`) and the per-client scores are regenerated chunk by chunk,
so memory is 3·d floats (Σ_j τ_j, numerator, denominator) plus the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .base import BatchMerger, Delta, FlatLayout, check_range, register
from .sparsify import chunk_size, kth_smallest


def _minmax(x: Tensor, lo: float, hi: float) -> Tensor:
    if hi > lo:
        return (x - lo) / (hi - lo)
    return torch.zeros_like(x)


@register("pcb")
class PCB(BatchMerger):
    """PCB-Merging as released (see the module docstring)."""

    def __init__(self, ratio: float = 0.1, clamp_q: float = 1e-4, scale: float = 1.0) -> None:
        self.ratio = check_range("ratio", ratio, 0.0, 1.0, lo_open=True)
        self.clamp_q = check_range("clamp_q", clamp_q, 0.0, 0.5, hi_open=True)
        self.scale = check_range("scale", scale, -1e6, 1e6)

    def _merge(
        self, layout: FlatLayout, deltas: Sequence[Delta], weights: list[float], key: int | None
    ) -> Tensor:
        n, d = len(deltas), layout.total
        mean_w = sum(weights) / n
        wt = [w / mean_w for w in weights]
        total = layout.zeros()
        for i, delta in enumerate(deltas):
            for off, x in layout.pieces(delta, chunk_size(layout.total, layout.device)):
                total[off : off + x.numel()].add_(x, alpha=wt[i])
        num, den = layout.zeros(), layout.zeros()
        i_lo = math.floor(d * self.clamp_q)
        i_hi = max(i_lo, math.floor(d * (1 - self.clamp_q)) - 1)
        i_beta = min(d - 1, math.floor(d * (1 - self.ratio)))
        for i, delta in enumerate(deltas):
            if wt[i] == 0:
                continue

            def absval(delta: Delta = delta) -> Iterator[Tensor]:
                return (
                    x.abs()
                    for _, x in layout.pieces(delta, chunk_size(layout.total, layout.device))
                )

            a_lo = kth_smallest(absval, i_lo + 1, nonneg=True)
            a_hi = kth_smallest(absval, i_hi + 1, nonneg=True)

            def beta(
                delta: Delta = delta, a_lo: float = a_lo, a_hi: float = a_hi
            ) -> Iterator[Tensor]:
                for off, x in layout.pieces(delta, chunk_size(layout.total, layout.device)):
                    a = x.abs().clamp(a_lo, a_hi)
                    intra = torch.exp(n * _minmax(a, a_lo, a_hi) ** 2)
                    inter = torch.tanh(x * total[off : off + x.numel()])
                    yield intra * inter

            b_lo = kth_smallest(beta, i_beta + 1)
            b_hi = max(float(c.max()) for c in beta())
            for (off, x), b in zip(
                layout.pieces(delta, chunk_size(layout.total, layout.device)), beta(), strict=True
            ):
                s = _minmax(b.clamp_min(b_lo), b_lo, b_hi) * wt[i]
                clamped = torch.sign(x) * x.abs().clamp(a_lo, a_hi)
                sl = slice(off, off + x.numel())
                num[sl] += s * clamped
                den[sl] += s
        return num.div_(den.clamp_min_(1e-12)).mul_(self.scale)
