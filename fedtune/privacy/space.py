"""Where clipping, noise and secure sums act: a codec's coefficients or the adapter's parameters.

A codec that declares ``linear = True`` decodes a payload as ``Δ = B_t c`` with a basis ``B_t``
that every client of round ``t`` shares (``dense``: ``B = I``; ``subspace``: the round's SRHT
``P_t``, plus the identity on a dense head). It exposes ``coef_vector(payload, like)`` ->
``(u, round)``, ``from_coef(u, like, round)`` and ``encode_coef(u, like, key=, round=, slot=)``,
where ``u = g ⊙ c`` is the coefficient vector scaled per block by the basis gain ``g`` (``α_l``
for the subspace), so that ``‖B_t c‖ ≤ ‖u‖``: a clip of ``u`` to ``C`` bounds the update in
parameter space by ``C`` too, and the same ``dp-clip-norm`` means the same thing for every
codec. Sums, noise and clipping then act on K numbers instead of d (docs/privacy.md).

Any other codec (per-client keys: ``srht``, ``gaussian``, ``countsketch``, ``topk``, ``spsa``)
gets the parameter space: the decoded update, flattened. Its sums live in d dimensions, so
only central DP applies to it; distributed DP and SecAgg are refused by fedtune.parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]


def is_linear(codec: Any) -> bool:
    """The codec's own declaration (see the module docstring)."""
    return bool(getattr(codec, "linear", False))


def flatten(delta: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([delta[n].detach().to("cpu", torch.float32).reshape(-1) for n in like])


def unflatten(u: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Tensors:
    out, pos = {}, 0
    for n, t in like.items():
        out[n] = u[pos : pos + t.numel()].reshape(t.shape).clone()
        pos += t.numel()
    if pos != u.numel():
        raise ValueError(f"vector has {u.numel()} entries, the adapter {pos}")
    return out


class Space:
    """The round's vector space for one codec and adapter layout ``like``."""

    def __init__(self, codec: Any, like: Mapping[str, torch.Tensor]) -> None:
        self.codec, self.like = codec, dict(like)
        self.linear = is_linear(codec)
        self.kind = "coefficients" if self.linear else "parameters"

    def dim(self, server_round: int = 1) -> int:
        if self.linear:
            return int(self.codec.coef_dim(self.like))
        return sum(t.numel() for t in self.like.values())

    def vector(
        self, payload: bytes, delta: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``u`` of one client's update (its coefficients, or its decoded update flattened)."""
        if self.linear:
            return self.codec.coef_vector(payload, self.like)[0]
        if delta is None:
            raise ValueError("a codec without a linear basis needs the decoded update")
        return flatten(delta, self.like)

    def delta(self, u: torch.Tensor, server_round: int) -> Tensors:
        """The update in parameter space that ``u`` stands for (the one reconstruction)."""
        if self.linear:
            return dict(self.codec.from_coef(u, self.like, server_round))
        return unflatten(u, self.like)

    def encode(self, u: torch.Tensor, *, key: int, server_round: int, slot: int) -> bytes:
        """A payload carrying ``u`` (a client re-encodes its clipped, noised vector)."""
        if not self.linear:
            raise ValueError(f"codec {type(self.codec).__name__} has no linear basis")
        return bytes(self.codec.encode_coef(u, self.like, key=key, round=server_round, slot=slot))
