"""``spsa``: zeroth-order updates as (key, scalar) pairs, MeZO / FedKSeed style.

The client runs :func:`fedtune.zo.zo_train`, which returns one projected-gradient scalar
``g_s`` per step; the payload holds ``lr`` (f64) and the ``g_s`` (fp32 or fp16). The decoder
regenerates ``z_s`` from the issued key and replays ``Δ = Σ_s float32(−lr·g_s) z_s``
(Malladi et al. 2023, Alg. 1; Qin et al. 2024), which equals the client's parameter change
to float32 rounding. Usage on the client::

    scalars, losses = zo_train(params, loss_fn, batches, steps=S, lr=codec.lr, eps=1e-3, key=key,
                               scalar_bits=codec.coef_bits)
    payload = codec.encode(ZOUpdate(scalars, like=trainable_state), key, round=t, slot=j)

Body: ``f64 lr | S scalars``; the K table holds ``[S]``. Replay costs S·d normals.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

import fedtune.codecs.quantize as q
import fedtune.codecs.wire as wire
from fedtune import zo
from fedtune.codecs.base import (
    Codec,
    Delta,
    PayloadError,
    check_ids,
    check_spec,
    empty_like_spec,
    spec_hash,
)
from fedtune.codecs.registry import register


@dataclasses.dataclass(frozen=True)
class ZOUpdate:
    """What the spsa codec encodes: the per-step scalars and the trainable-state layout."""

    scalars: Sequence[float]
    like: Mapping[str, torch.Tensor]


@register("spsa")
@dataclasses.dataclass
class SpsaCodec(Codec):
    """Options: ``lr`` (the client's ZO learning rate, required), ``coef_bits`` (32 or 16),
    ``max_steps`` (payloads with more steps are rejected)."""

    zeroth_order: ClassVar[bool] = True

    lr: float
    coef_bits: int = 32
    max_steps: int = 100_000

    name = "spsa"

    def __post_init__(self) -> None:
        if not isinstance(self.lr, int | float) or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite float, got {self.lr!r}")
        self._coef = q.coef_from_bits(self.coef_bits, allowed=(32, 16))
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {self.max_steps!r}")

    def max_payload_bytes(self, like: Delta) -> int:
        return wire.max_size(1, 8 + 4 * self.max_steps)

    def encode(self, delta: Any, key: int, *, round: int = 0, slot: int = 0) -> bytes:
        if not isinstance(delta, ZOUpdate):
            raise TypeError(
                "spsa encodes zeroth-order scalars, not a dense delta: pass "
                "ZOUpdate(scalars, like=trainable_state) with scalars from fedtune.zo.zo_train"
            )
        check_ids(key, round, slot)
        check_spec(delta.like)
        g = np.asarray(list(delta.scalars), dtype=np.float64)
        if len(g) > self.max_steps:
            raise ValueError(f"{len(g)} steps exceed max_steps={self.max_steps}")
        if not np.isfinite(g).all():
            raise ValueError("spsa scalars must be finite")
        dt = "<f4" if self.coef_bits == 32 else "<f2"
        cast = g.astype(dt)
        if not np.array_equal(cast.astype(np.float64), g):
            raise ValueError(
                f"scalars are not exactly representable in fp{self.coef_bits}: run zo_train "
                f"with scalar_bits={self.coef_bits} so the client applies what it sends"
            )
        body = struct.pack("<d", float(self.lr)) + cast.tobytes()
        header = wire.Header(
            codec_id=wire.codec_id(self.name),
            coef=self._coef,
            flags=0,
            round=round,
            slot=slot,
            key=key,
            layout=spec_hash(delta.like, self.layout_salt),
            ks=(len(g),),
            scales=None,
        )
        return wire.pack(header, body)

    def decode(
        self,
        payload: bytes,
        like: Delta,
        *,
        key: int | None = None,
        round: int | None = None,
        slot: int | None = None,
    ) -> dict[str, torch.Tensor]:
        check_spec(like)
        h, body = wire.unpack(payload, self.max_payload_bytes(like))
        wire.check_header(
            h,
            codec=self.name,
            layout=spec_hash(like, self.layout_salt),
            n_blocks=1,
            key=key,
            round=round,
            slot=slot,
        )
        if h.flags:
            raise PayloadError(f"spsa payloads carry no flags, got {h.flags:#x}")
        if h.coef not in (wire.COEF_FP32, wire.COEF_FP16):
            raise PayloadError(f"spsa scalars must be fp32 or fp16, got {wire.COEF_NAMES[h.coef]}")
        steps = h.ks[0]
        if steps > self.max_steps:
            raise PayloadError(f"{steps} steps exceed max_steps={self.max_steps}")
        if len(body) != 8 + q.nbytes(h.coef, steps):
            raise PayloadError(f"body length {len(body)} does not match {steps} scalars")
        (lr,) = struct.unpack("<d", body[:8])
        if not math.isfinite(lr):
            raise PayloadError("non-finite lr in payload")
        if lr != float(self.lr):
            raise PayloadError(f"lr mismatch: payload lr={lr}, decoder lr={self.lr}")
        dt = "<f4" if h.coef == wire.COEF_FP32 else "<f2"
        g = np.frombuffer(body[8:], dtype=dt).astype(np.float64)
        if not np.isfinite(g).all():
            raise PayloadError("non-finite scalar in payload")
        out = empty_like_spec(like)
        flat = [t.view(-1) for t in out.values()]
        for s, gs in enumerate(g.tolist()):
            a = zo.step_coef(lr, gs)
            for i, t in enumerate(flat):
                t.add_(zo.direction(h.key, s, i, t.numel()), alpha=a)
        for name, t in out.items():
            if not bool(torch.isfinite(t).all()):
                raise PayloadError(f"replayed update of {name!r} is non-finite")
        return out
