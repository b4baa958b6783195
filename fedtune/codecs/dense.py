"""``dense``: the update itself, per tensor, as fp32, fp16 (tensor-relative) or int8.

The baseline every sketch is compared with. int8 uses a per-tensor max scale and unbiased
stochastic rounding from the portable RNG keyed by the client key (``quantize.py``); fp16 is
stored relative to the tensor's max |x| so it cannot overflow. Zero tensors cost nothing.
Shares the wire format and decoder of the sketch codecs: every block has ``K_l = d_l``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fedtune.codecs.base import Block
from fedtune.codecs.projection import ProjectionCodec
from fedtune.codecs.registry import register


@register("dense")
@dataclasses.dataclass
class DenseCodec(ProjectionCodec):
    """Options: ``coef_bits`` in {32, 16, 8}; ``max_block`` (int8/fp16 scale granularity)."""

    k: int | None = dataclasses.field(default=None, init=False)
    compression: float = dataclasses.field(default=64.0, init=False)
    min_per_block: int = dataclasses.field(default=1, init=False)
    unbiased: bool = dataclasses.field(default=True, init=False)

    replayable: ClassVar[bool] = True  # elementwise dequantize and copy, no sums
    name = "dense"

    def __post_init__(self) -> None:
        if self.coef_bits not in (32, 16, 8):
            raise ValueError(f"coef_bits must be one of 32, 16, 8, got {self.coef_bits!r}")
        super().__post_init__()

    def allocate_blocks(self, blocks: list[Block], norms: list[float]) -> list[int]:
        return [b.size if nrm > 0 else 0 for b, nrm in zip(blocks, norms, strict=True)]

    def omega(self, d: int, k: int) -> float:
        return 0.0

    def coef_std(self, d: int, k: int) -> float:
        return 1.0
