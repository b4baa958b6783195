"""Codec protocol, payload errors, block layout and input validation shared by all codecs."""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from fedtune import kernels
from fedtune.layout import combine_hashes, layout_hash

Delta = Mapping[str, torch.Tensor]


class PayloadError(ValueError):
    """A payload that cannot be decoded; the message names what was wrong."""


@dataclasses.dataclass(frozen=True)
class Block:
    """A contiguous slice ``[start, stop)`` of one flattened tensor: the unit of projection."""

    index: int
    name: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def make_blocks(spec: Delta, max_block: int) -> list[Block]:
    """One block per tensor, tensors above ``max_block`` elements split into equal chunks.

    Depends only on names and shapes, so encoder and decoder build the same list.
    """
    blocks: list[Block] = []
    for name, t in spec.items():
        n = t.numel()
        parts = max(1, math.ceil(n / max_block))
        for p in range(parts):
            a, b = n * p // parts, n * (p + 1) // parts
            blocks.append(Block(len(blocks), name, a, b))
    return blocks


def check_spec(like: Any) -> None:
    """``like`` must be a non-empty mapping of names to tensors."""
    if not isinstance(like, Mapping) or not like:
        raise TypeError("like must be a non-empty dict[str, Tensor] describing the adapter")
    for name, t in like.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"like[{name!r}] must map a str to a Tensor")


def check_delta(delta: Any, *, finite: bool = True) -> dict[str, torch.Tensor]:
    """Validate an update and return its tensors as flat float32 (same device).

    ``finite=False`` skips the NaN/Inf scan for callers that compute every block's norm anyway
    and check that instead (:func:`sq_norm` is finite iff the values are).
    """
    check_spec(delta)
    out: dict[str, torch.Tensor] = {}
    for name, t in delta.items():
        if not t.is_floating_point():
            raise TypeError(f"delta[{name!r}] must be a floating tensor, got {t.dtype}")
        flat = t.detach().reshape(-1).to(torch.float32)
        if finite and not math.isfinite(sq_norm(flat)):
            raise ValueError(f"delta[{name!r}] contains non-finite values")
        out[name] = flat
    return out


def sq_norm(x: torch.Tensor) -> float:
    """``‖x‖²`` of a flat float32 tensor, accumulated in float64 (finite iff x is finite).

    CPU with numba: one read pass (:func:`fedtune.kernels.sum_squares`), no float64 copy.
    """
    if kernels.AVAILABLE and x.device.type == "cpu":
        return float(kernels.sum_squares(np.ascontiguousarray(x.detach().numpy())))
    return float(torch.linalg.vector_norm(x.detach(), dtype=torch.float64) ** 2)


def check_ids(key: int, round: int, slot: int) -> None:
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 1 << 64:
        raise ValueError(f"key must be an int in [0, 2**64), got {key!r}")
    for name, v in (("round", round), ("slot", slot)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 32:
            raise ValueError(f"{name} must be an int in [0, 2**32), got {v!r}")


def empty_like_spec(like: Delta, *, zero: bool = True) -> dict[str, torch.Tensor]:
    """fp32 CPU zeros (``zero=False``: uninitialised) with the names and shapes of ``like``."""
    new = torch.zeros if zero else torch.empty
    return {n: new(t.shape, dtype=torch.float32) for n, t in like.items()}


def spec_hash(like: Delta, salt: int = 0) -> int:
    """The wire header's layout hash: tensor names, shapes and dtypes, combined with ``salt``
    when the adapter has structure the tensors do not show (MoS index lists:
    :func:`fedtune.adapters.mos.mos_layout_digest`)."""
    return combine_hashes(layout_hash(like), salt) if salt else layout_hash(like)


class Codec(abc.ABC):
    """Encodes an update ``dict[str, Tensor]`` into bytes and back.

    ``encode(delta, key, round=, slot=)`` -> payload; ``decode(payload, like=, key=, round=,
    slot=)`` -> fp32 CPU dict with the names and shapes of ``like``. ``key``/``round``/``slot``
    given to ``decode`` are expectations: a payload whose header disagrees raises
    :class:`PayloadError`. Decoding is deterministic: the same payload decodes to the same
    tensors on every run.
    """

    name: ClassVar[str]
    #: folded into the layout hash of every payload (``spec_hash``); set by ``pipeline.codec``
    #: (``parts.codec(cfg, salt=...)``) so that MoS payloads for other index lists are rejected
    layout_salt: int = 0
    #: the decoder is bit-identical on every machine and thread count (integer / elementwise
    #: arithmetic, no BLAS sums), so clients can replay the server's round from payloads
    #: (the compact downlink, fedtune/downlink.py)
    replayable: ClassVar[bool] = True
    #: the payload is zeroth-order (key, scalar) pairs: it needs the zeroth-order trainer
    zeroth_order: ClassVar[bool] = False
    #: decode is ``Δ = B_t c``, linear in the coefficients, with a basis ``B_t`` every client
    #: of round t shares; such a codec also has ``coef_dim``, ``coef_vector``, ``from_coef``,
    #: ``encode_coef`` (fedtune/privacy/space.py). DP noise in coefficient space, distributed
    #: DP and SecAgg need it
    linear: ClassVar[bool] = False

    @abc.abstractmethod
    def encode(self, delta: Any, key: int, *, round: int = 0, slot: int = 0) -> bytes: ...

    @abc.abstractmethod
    def decode(
        self,
        payload: bytes,
        like: Delta,
        *,
        key: int | None = None,
        round: int | None = None,
        slot: int | None = None,
    ) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def max_payload_bytes(self, like: Delta) -> int:
        """Largest payload this codec could produce for ``like``; larger ones are rejected."""
