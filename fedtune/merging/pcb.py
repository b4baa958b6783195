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

Not a :mod:`.task_vectors` pipeline: the "sparsification" (scores ``s_i``) of each client
depends on ``Σ_j τ_j`` over all clients, so it needs two passes (a batch merger), and the
merge is a mean weighted per coordinate by those scores. It reuses the shared steps: the
first pass is a :class:`.task_vectors.WeightedSum`, chunks are :func:`.task_vectors.chunks`,
and λ is applied by :func:`.task_vectors.scaled`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import BatchMerger, Delta, FlatLayout, check_range, register
from .sparsify import kth_smallest
from .task_vectors import WeightedSum, WithOptions, check_scale, chunks, scaled, set_checked


def _minmax(x: Tensor, lo: float, hi: float) -> Tensor:
    if hi > lo:
        return (x - lo) / (hi - lo)
    return torch.zeros_like(x)


@dataclass(frozen=True)
class PCBOptions:
    ratio: float = 0.1
    clamp_q: float = 1e-4
    scale: float = 1.0

    def __post_init__(self) -> None:
        set_checked(
            self,
            ratio=check_range("ratio", self.ratio, 0.0, 1.0, lo_open=True),
            clamp_q=check_range("clamp_q", self.clamp_q, 0.0, 0.5, hi_open=True),
            scale=check_scale(self.scale),
        )


@register("pcb")
class PCB(WithOptions, BatchMerger):
    """PCB-Merging as released (see the module docstring)."""

    Options = PCBOptions
    options: PCBOptions

    def _merge(
        self, layout: FlatLayout, deltas: Sequence[Delta], weights: list[float], key: int | None
    ) -> Tensor:
        o, n, d = self.options, len(deltas), layout.total
        mean_w = sum(weights) / n
        wt = [w / mean_w for w in weights]
        sum_all = WeightedSum(layout)
        for delta, w in zip(deltas, wt, strict=True):
            for off, x in chunks(layout, layout.flat(delta)):
                sum_all.add(off, x, None, w)
        total = sum_all.sum
        num, den = layout.zeros(), layout.zeros()
        i_lo = math.floor(d * o.clamp_q)
        i_hi = max(i_lo, math.floor(d * (1 - o.clamp_q)) - 1)
        i_beta = min(d - 1, math.floor(d * (1 - o.ratio)))
        for delta, w in zip(deltas, wt, strict=True):
            if w == 0:
                continue
            f = layout.flat(delta)

            def absval(f: list[Tensor] = f) -> Iterator[Tensor]:
                return (x.abs() for _, x in chunks(layout, f))

            a_lo = kth_smallest(absval, i_lo + 1, nonneg=True)
            a_hi = kth_smallest(absval, i_hi + 1, nonneg=True)

            def beta(
                f: list[Tensor] = f, a_lo: float = a_lo, a_hi: float = a_hi
            ) -> Iterator[Tensor]:
                for off, x in chunks(layout, f):
                    intra = torch.exp(n * _minmax(x.abs().clamp(a_lo, a_hi), a_lo, a_hi) ** 2)
                    yield intra * torch.tanh(x * total[off : off + x.numel()])

            b_lo = kth_smallest(beta, i_beta + 1)
            b_hi = max(float(c.max()) for c in beta())
            for (off, x), b in zip(chunks(layout, f), beta(), strict=True):
                s = _minmax(b.clamp_min(b_lo), b_lo, b_hi) * w
                sl = slice(off, off + x.numel())
                num[sl] += s * (torch.sign(x) * x.abs().clamp(a_lo, a_hi))
                den[sl] += s
        return scaled(num.div_(den.clamp_min_(1e-12)), o.scale)
