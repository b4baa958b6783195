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
chunking-independent; ``merge(..., key=k)`` gives client ``i`` ``client_key(k, i)``);
mergekit's ``dare_*`` rescale to match the L1 norm instead of dividing by ``1 − p`` (the
paper's rule is used here). With ``density < 1`` one client's dropped delta is materialized
(d floats) to find its magnitude threshold.

Steps (:mod:`.task_vectors`): ``RandomDrop(drop_rate)`` then ``Magnitude(density, scope)``
(skipped at density 1); linear: weighted sum ``· λ / Σw``; ties: elect, scale. Streaming.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import check_choice, check_range, register

# Unused here (task_vectors chunks); kept as tests/test_merging.py monkeypatches this name.
from .sparsify import chunk_size  # noqa: F401
from .task_vectors import (
    SCOPES,
    Magnitude,
    RandomDrop,
    Steps,
    TaskVectorMerger,
    check_scale,
    set_checked,
)

MODES = ("linear", "ties")


@dataclass(frozen=True)
class DareOptions:
    drop_rate: float = 0.5
    merge: str = "linear"
    density: float = 1.0
    scale: float = 1.0
    scope: str = "global"

    def __post_init__(self) -> None:
        set_checked(
            self, drop_rate=check_range("drop_rate", self.drop_rate, 0.0, 1.0, hi_open=True)
        )
        check_choice("merge", self.merge, MODES)
        set_checked(self, density=check_range("density", self.density, 0.0, 1.0, lo_open=True))
        if self.merge == "linear" and self.density != 1.0:
            raise ValueError("density (a TIES trim after dropping) needs merge='ties'")
        set_checked(self, scale=check_scale(self.scale))
        check_choice("scope", self.scope, SCOPES)

    def steps(self) -> Steps:
        drop_trim = (RandomDrop(self.drop_rate), Magnitude(self.density, self.scope))
        return Steps(sparsify=drop_trim, elect=self.merge == "ties", scale=self.scale)


@register("dare")
class Dare(TaskVectorMerger):
    """DARE + linear / TIES merge. Randomized: needs a key (see :mod:`.base`)."""

    Options = DareOptions
    needs_key = True
