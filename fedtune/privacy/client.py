"""A client's side of DP and SecAgg: clip (and noise) its vector before anything leaves it.

Called after :func:`fedtune.pipeline.client_round` by the ClientApp and by fedtune.simulate
alike: the payload the trainer's codec produced is read back as its vector ``u``
(:class:`fedtune.privacy.Space`), clipped to the round's ``C_t`` with the client's share of
the noise added (:func:`fedtune.privacy.dp.privatize_vector`), then either re-encoded as a
payload (distributed DP without SecAgg) or returned as the float vector SecAgg sums.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtune.privacy.dp import ClientDP, privatize_vector
from fedtune.privacy.space import Space


def bit_scale(clip_range: float) -> float:
    """SecAgg carries the clip bit ``b`` as ``b · c/4`` so noisy bits in [-4, 4] fit ±c."""
    return clip_range / 4.0


def privatize_payload(
    codec: object,
    payload: bytes,
    like: Mapping[str, torch.Tensor],
    params: ClientDP,
    *,
    key: int,
    server_round: int,
    slot: int,
) -> tuple[bytes, dict[str, float]]:
    """(the payload of the clipped, noised vector, {'dp-clip-bit': its noised clip bit})."""
    space = Space(codec, like)
    v, bit = privatize_vector(space.vector(payload), params, key)
    return space.encode(v, key=key, server_round=server_round, slot=slot), {"dp-clip-bit": bit}


def secure_vector(
    codec: object,
    payload: bytes,
    like: Mapping[str, torch.Tensor],
    params: ClientDP | None,
    *,
    key: int,
    clip_range: float,
) -> torch.Tensor:
    """``[u, b·c/4]``: what the client puts into SecAgg's sum (clipped and noised under DP)."""
    u = Space(codec, like).vector(payload)
    bit = 0.0
    if params is not None:
        u, bit = privatize_vector(u, params, key)
    return torch.cat([u.reshape(-1).float(), torch.tensor([bit * bit_scale(clip_range)])])
