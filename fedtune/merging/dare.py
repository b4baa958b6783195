"""DARE: Drop And REscale, followed by a linear or a TIES merge.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024, Eq. (1)-(2) (code ``yule-BUAA/MergeLM``): each entry of a
client's delta is dropped with probability ``p`` (``drop_rate``) and survivors are divided
by ``1 − p``, so the delta is unbiased. Then

* ``merge="linear"``: the weighted mean ``λ · Σ w_i τ̂_i / Σ w_i`` (PEFT ``dare_linear`` and
  MergeLM DARE+TA use a weighted sum; the mean keeps λ = 1 equal to FedAvg in expectation).
* ``merge="ties"``: the fedtune TIES convention (:mod:`.ties`) on the dropped deltas, with an
  optional magnitude trim ``density`` (default 1.0 = no trim, as PEFT ``dare_ties``; MergeLM's
  DARE-TIES uses 0.2).

Deviations: the Bernoulli draws come from :mod:`fedtune.rng` keyed per client (portable,
chunking-independent); mergekit's ``dare_*`` rescale to match the L1 norm instead of
dividing by ``1 − p`` (the paper's rule is used here). With ``density < 1`` one client's
dropped delta is materialized (d floats) to find its magnitude threshold.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .base import Delta, FlatLayout, StreamingMerger, check_choice, check_range, register
from .sparsify import SignedAccumulator, bernoulli_keep, chunk_size
from .ties import thresholded_pieces

MODES = ("linear", "ties")


@register("dare")
class Dare(StreamingMerger):
    """DARE + linear / TIES merge. Randomized: needs a key (see :mod:`.base`)."""

    needs_key = True

    def __init__(
        self,
        drop_rate: float = 0.5,
        merge: str = "linear",
        density: float = 1.0,
        scale: float = 1.0,
        scope: str = "global",
    ) -> None:
        super().__init__()
        self.drop_rate = check_range("drop_rate", drop_rate, 0.0, 1.0, hi_open=True)
        check_choice("merge", merge, MODES)
        self.mode = merge
        self.density = check_range("density", density, 0.0, 1.0, lo_open=True)
        if merge == "linear" and self.density != 1.0:
            raise ValueError("density (a TIES trim after dropping) needs merge='ties'")
        self.scale = check_range("scale", scale, -1e6, 1e6)
        check_choice("scope", scope, ("global", "tensor"))
        self.scope = scope
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

    def _dropped(self, layout: FlatLayout, delta: Delta, key: int) -> Iterator[tuple[int, Tensor]]:
        """``(flat_offset, chunk)`` of the dropped-and-rescaled delta."""
        keep = 1.0 - self.drop_rate
        for off, x in layout.pieces(delta, chunk_size(layout.total, layout.device)):
            m = bernoulli_keep(key, x.numel(), keep, offset=off, device=x.device)
            yield off, torch.where(m, x / keep, 0.0)

    def _add(self, layout: FlatLayout, delta: Delta, weight: float, key: int | None) -> None:
        assert key is not None
        if self.mode == "linear":
            assert self._sum is not None
            for off, x in self._dropped(layout, delta, key):
                self._sum[off : off + x.numel()].add_(x, alpha=weight)
            return
        assert self._acc is not None
        if self.density >= 1.0:
            for off, x in self._dropped(layout, delta, key):
                self._acc.add(off, x, weight)
            return
        full = layout.zeros()
        for off, x in self._dropped(layout, delta, key):
            full[off : off + x.numel()] = x
        flats = [
            full[o : o + f.numel()] for o, f in zip(layout.offsets, layout.flat(delta), strict=True)
        ]
        for off, x, t in thresholded_pieces(flats, layout.offsets, self.density, self.scope):
            self._acc.add(off, x, weight, t)

    def _finish(self, layout: FlatLayout) -> Tensor:
        if self.mode == "linear":
            assert self._sum is not None
            return self._sum.mul_(self.scale / self._weight_sum)
        assert self._acc is not None
        return self._acc.finish().mul_(self.scale)
