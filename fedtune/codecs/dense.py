"""``dense``: the update itself, per tensor, as fp32, fp16 (tensor-relative) or int8.

The baseline every sketch is compared with. int8 uses a per-tensor max scale and unbiased
stochastic rounding from the portable RNG keyed by the client key (``quantize.py``); fp16 is
stored relative to the tensor's max |x| so it cannot overflow. Zero tensors cost nothing.
Shares the wire format and decoder of the sketch codecs: every block has ``K_l = d_l``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

import fedtune.codecs.wire as wire
from fedtune.codecs.base import Block, Delta
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
    #: decode is the identity on the coefficients: Σ of payload vectors decodes to Σ of updates
    #: (DP noise and SecAgg sums act on them; fedtune/privacy/space.py)
    linear: ClassVar[bool] = True
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

    # --- the coefficient view of a linear codec (fedtune/privacy/space.py): B = I, u = Δ ---

    def coef_dim(self, like: Delta) -> int:
        return sum(t.numel() for t in like.values())

    def coef_vector(self, payload: bytes, like: Delta) -> tuple[torch.Tensor, int]:
        """(the decoded update as one flat fp32 vector, the payload's round)."""
        h, _ = wire.unpack(payload, self.max_payload_bytes(like))
        delta = self.decode(payload, like)
        return torch.cat([delta[n].reshape(-1) for n in like]), h.round

    def from_coef(self, u: torch.Tensor, like: Delta, server_round: int) -> dict[str, torch.Tensor]:
        out, pos = {}, 0
        for n, t in like.items():
            out[n] = u[pos : pos + t.numel()].reshape(t.shape).to(torch.float32).clone()
            pos += t.numel()
        return out

    def encode_coef(self, u: torch.Tensor, like: Delta, *, key: int, round: int, slot: int) -> Any:
        return self.encode(self.from_coef(u, like, round), key, round=round, slot=slot)
