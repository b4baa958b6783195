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
(mergekit bug noted in the research note).

Steps (:mod:`.task_vectors`): ``RowOutliers(density, gamma)``; linear: weighted sum
``· λ / Σw``; ties: elect, scale. Streaming: per-client masks, O(d) state.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import check_choice, check_range, register
from .task_vectors import RowOutliers, Steps, TaskVectorMerger, check_scale, set_checked


@dataclass(frozen=True)
class BreadcrumbsOptions:
    density: float = 0.15
    gamma: float = 0.006
    merge: str = "linear"
    scale: float = 1.0

    def __post_init__(self) -> None:
        set_checked(
            self,
            density=check_range("density", self.density, 0.0, 1.0, lo_open=True),
            gamma=check_range("gamma", self.gamma, 0.0, 1.0, hi_open=True),
        )
        check_choice("merge", self.merge, ("linear", "ties"))
        set_checked(self, scale=check_scale(self.scale))

    def steps(self) -> Steps:
        rows = RowOutliers(self.density, self.gamma)
        return Steps(sparsify=(rows,), elect=self.merge == "ties", scale=self.scale)


@register("breadcrumbs")
class Breadcrumbs(TaskVectorMerger):
    """Breadcrumbs masks per client, then a weighted mean or a TIES merge."""

    Options = BreadcrumbsOptions
