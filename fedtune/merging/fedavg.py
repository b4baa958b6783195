"""FedAvg: the weighted mean of client deltas.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, Algorithm 1: ``θ_{t+1} = θ_t + Σ_i (n_i / N) Δ_i``. With weights =
number of examples this is exactly Flower's ``aggregate()``. No deviation.
"""

from __future__ import annotations

from torch import Tensor

from .base import Delta, FlatLayout, StreamingMerger, register
from .sparsify import chunk_size


@register("fedavg")
class FedAvg(StreamingMerger):
    """``Σ_i w_i τ_i / Σ_i w_i``; state: one running weighted sum (d floats)."""

    #: a fixed linear combination of the deltas: clients can replay the round from payloads
    linear = True
    #: exactly the weighted mean, as FedEx-LoRA's exact mode needs
    weighted_mean = True

    def __init__(self) -> None:
        super().__init__()
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
        return self._sum.div_(self._weight_sum)
