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
"""

from __future__ import annotations

from torch import Tensor

from .base import Delta, FlatLayout, StreamingMerger, check_range, register
from .sparsify import chunk_size


@register("task-arithmetic")
class TaskArithmetic(StreamingMerger):
    """Scaled weighted sum/mean of deltas (streaming, one d-vector of state)."""

    def __init__(self, scale: float = 1.0, normalize: bool = True) -> None:
        super().__init__()
        self.scale = check_range("scale", scale, -1e6, 1e6)
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be true or false, got {normalize!r}")
        self.normalize = normalize
        self._sum: Tensor | None = None

    def _reset_state(self) -> None:
        self._sum = None

    def _begin(self, layout: FlatLayout) -> None:
        self._sum = layout.zeros()

    def _add(self, layout: FlatLayout, delta: Delta, weight: float, key: int | None) -> None:
        assert self._sum is not None
        for off, x in layout.pieces(delta, chunk_size(layout.total, layout.device)):
            self._sum[off : off + x.numel()].add_(x, alpha=weight)

    def _finish(self, layout: FlatLayout) -> Tensor:
        assert self._sum is not None
        denom = self._weight_sum if self.normalize else self._weight_sum / self._count
        return self._sum.mul_(self.scale / denom)
