"""Task Arithmetic: ``τ_m = λ · Σ_i w̃_i τ_i``.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, §2: the merged model is
``θ_0 + λ Σ_t τ_t`` with unit task weights and λ tuned on validation data.

Weights (the choice made here, since the paper has none and references disagree):

* ``normalize=True`` (default): ``w̃_i = w_i / Σ_j w_j``, so the result is ``λ ·`` FedAvg.
  Tao et al. (arXiv 2411.18607) show task arithmetic is one-shot FedAvg; with λ = 1 a
  round of this merger equals FedAvg, which is the safe default in a federated loop.
* ``normalize=False``: ``w̃_i = w_i / mean_j(w_j)``, i.e. the paper's plain **sum** when
  the weights are equal, and still invariant to scaling all weights together. (mergekit's
  ``task_arithmetic`` multiplies by the raw weights instead; with weights = number of
  examples that would scale the update by thousands, so it is not offered.)

Steps (:mod:`.task_vectors`): no sparsification, no election, a weighted sum, then
``· λ / Σw`` (or ``/ mean w``). Streaming, one d-vector of state.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .task_vectors import Steps, TaskVectorMerger, check_scale, set_checked


@dataclass(frozen=True)
class TaskArithmeticOptions:
    scale: float = 1.0
    normalize: bool = True

    def __post_init__(self) -> None:
        set_checked(self, scale=check_scale(self.scale))
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")

    def steps(self) -> Steps:
        return Steps(normalize=self.normalize, scale=self.scale)


@register("task-arithmetic")
class TaskArithmetic(TaskVectorMerger):
    """Scaled weighted sum/mean of deltas. ``weighted_mean`` is True iff ``scale == 1`` and
    ``normalize`` (then it is FedAvg, up to rounding: ``Σ w_i τ_i · (1/Σw)``)."""

    Options = TaskArithmeticOptions
    #: Σ_i (λ w_i / Σw) τ_i (or / mean w) for any options: clients can replay it from payloads.
    linear = True
