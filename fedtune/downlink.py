"""Compact downlink: clients rebuild the global adapter from the round's payloads.

With ``downlink = "dense"`` (the default) every train message carries the global adapter,
``|θ|`` fp32 values. With a linear merger the new global state is a deterministic function of
the previous one and of the round's accepted payloads::

    θ_t = server_opt.step(θ_{t−1}, aggregate(merger, [f_i · decode(p_i)], [w_i], key_t))

so a client that holds ``θ_g`` can rebuild ``θ_t`` from the *chain* of rounds ``g+1..t``
(each round: the accepted payloads, their slots, keys, merge weights and clip factors, and
the round's merge key). It decodes each payload with the same codec and calls the same
``merging.aggregate`` / ``server_opt.step`` the server used, in the same (slot) order, on the
CPU, so the rebuilt tensors are bit-identical to the server's; a SHA-256 :func:`state_digest`
of the expected state proves it. See docs/downlink.md for when each downlink is cheaper.

The server keeps a :class:`History` (what each round applied and which state each client slot
holds) and asks it for the chain of a slot; the client calls :func:`rebuild`. Nothing here
imports Flower (the records live in :mod:`fedtune.fl.downlink`).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.round import apply_updates

Tensors = dict[str, torch.Tensor]

# Which runs can use a compact downlink is asked of the methods themselves (a merger's
# ``linear``, a server optimizer's ``stateless``, a codec's ``replayable``): see
# fedtune.parts.validate.


class DownlinkError(ValueError):
    """A client could not rebuild the global state the server announced."""


@dataclass(frozen=True)
class Update:
    """One accepted client update of a round, as the server merged it."""

    slot: int
    key: int  # the key the server issued to that slot in that round
    weight: float  # merge weight (num-examples)
    clip: float  # the norm-clip factor the server applied to the decoded delta (1.0: none)
    payload: bytes


@dataclass(frozen=True)
class Step:
    """What round ``round`` applied to the global state; no updates: the state was kept."""

    round: int
    merge_key: int
    updates: tuple[Update, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(len(u.payload) for u in self.updates)


def state_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 over (name, dtype, shape, raw little-endian fp32 bytes) in sorted-name order.

    Sorted, so the digest does not depend on dict order; fp32 CPU, so it does not depend on
    where the tensors live. Two states have the same digest iff they are bit-identical.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(b"\0")
        h.update(struct.pack(f"<{t.dim() + 1}q", t.dim(), *t.shape))
        h.update(t.numpy().astype("<f4", copy=False).tobytes())
    return h.digest()


def apply_step(
    state: Mapping[str, torch.Tensor], step: Step, *, codec: Any, merger: Any, server_opt: Any
) -> Tensors:
    """The state after ``step``: decode, clip-scale, merge and apply, exactly as the server did
    (:func:`fedtune.round.apply_updates`, the same function the server's round calls).

    ``server_opt`` must be stateless (``none`` / ``sgd``); the clip factors are the ones the
    server sent (the norm behind them is a float reduction whose rounding may depend on the
    thread count, the factor is not).
    """
    if not step.updates:
        return dict(state)
    deltas = [
        codec.decode(u.payload, like=state, key=u.key, round=step.round, slot=u.slot)
        for u in step.updates
    ]
    new_state, _ = apply_updates(
        state,
        deltas,
        [u.weight for u in step.updates],
        [u.clip for u in step.updates],
        merger=merger,
        server_opt=server_opt,
        key=step.merge_key,
    )
    return new_state


def rebuild(
    base: Mapping[str, torch.Tensor],
    steps: Sequence[Step],
    digest: bytes,
    *,
    codec: Any,
    merger: Any,
    server_opt: Any,
) -> Tensors:
    """Apply ``steps`` to ``base`` in order and check the result against ``digest``.

    Raises :class:`DownlinkError` when a payload does not decode or the rebuilt state differs
    from the server's (then the server sends this client the dense state next time).
    """
    state: Tensors = {k: v.detach().to("cpu", torch.float32) for k, v in base.items()}
    for step in steps:
        try:
            state = apply_step(state, step, codec=codec, merger=merger, server_opt=server_opt)
        except ValueError as e:  # PayloadError and shape / name mismatches are ValueErrors
            raise DownlinkError(f"cannot rebuild round {step.round}: {e}") from e
    got = state_digest(state)
    if got != digest:
        rounds = f"{steps[0].round}..{steps[-1].round}" if steps else "none"
        raise DownlinkError(
            f"rebuilt global state (rounds {rounds}) has digest {got.hex()[:16]}, the server's "
            f"is {digest.hex()[:16]}: the client's base state or arithmetic differs"
        )
    return state


class History:
    """Server side: the steps of past rounds and the state each client slot holds.

    ``held[slot] = v`` means the slot's client stored the global state *before* round ``v+1``
    (version ``v``; version 0 is the initial adapter). ``client_initial`` says clients can
    build version 0 themselves (the keyed initial adapter), so even a slot never sampled can
    get a chain from 0 — its digest check catches a client whose initial adapter differs.
    """

    def __init__(self, mode: str, *, client_initial: bool = False) -> None:
        if mode not in ("dense", "payloads", "auto"):
            raise ValueError(f"downlink mode must be dense, payloads or auto, got {mode!r}")
        self.mode = mode
        self.client_initial = client_initial
        self.steps: dict[int, Step] = {}
        self.held: dict[int, int] = {}
        self.needs_dense: set[int] = set()  # slots whose last rebuild failed or is unknown

    def record(self, step: Step) -> None:
        self.steps[step.round] = step

    def base(self, slot: int) -> int | None:
        """The version a chain for ``slot`` would start from, or None (send dense)."""
        if slot in self.needs_dense:
            return None
        if slot in self.held:
            return self.held[slot]
        return 0 if self.client_initial else None

    def chain(self, slot: int, version: int) -> tuple[int, list[Step]] | None:
        """(base version, steps base+1..version) for ``slot``, or None when it must get dense."""
        if self.mode == "dense":
            return None
        base = self.base(slot)
        if base is None or base > version:
            return None
        rounds = range(base + 1, version + 1)
        if any(r not in self.steps for r in rounds):
            return None  # a round we have no record of (resumed run, pruned history)
        return base, [self.steps[r] for r in rounds]

    def delivered(self, slot: int, version: int) -> None:
        """The slot's client replied without error: it stored version ``version``."""
        self.held[slot] = version
        self.needs_dense.discard(slot)

    def failed(self, slot: int) -> None:
        """No reply or an error: what the slot holds is unknown, so it gets dense next time."""
        self.held.pop(slot, None)
        self.needs_dense.add(slot)

    def prune(self, dense_bytes: int) -> None:
        """In ``auto`` mode drop steps no chain cheaper than ``dense_bytes`` could contain.

        Going back from the newest round, once the payload bytes of the newer rounds exceed the
        dense state, any chain reaching further back costs more than dense and is never sent.
        (``payloads`` mode keeps every step: a run's payloads, small for projection codecs.)
        """
        if self.mode != "auto":
            return
        total = 0
        for r in sorted(self.steps, reverse=True):
            if total > dense_bytes:
                del self.steps[r]
            else:
                total += self.steps[r].nbytes


# ---------------------------------------------------------------------------------- wire format
# One byte string per train message (little-endian), so the downlink costs one uint8 array:
#   b"FTDL" | u8 version | 3 zero bytes | u32 base | u32 version | 32-byte digest | u32 n_steps
#   per step:   u32 round | u64 merge key | u32 n_updates
#   per update: u32 slot | u64 key | f64 weight | f64 clip | u32 length | payload
#   u32 CRC32 of every byte before it
_MAGIC, _VERSION = b"FTDL", 1
_HEAD = struct.Struct("<4sB3xII32sI")
_STEP = struct.Struct("<IQI")
_UPDATE = struct.Struct("<IQddI")


@dataclass(frozen=True)
class Chain:
    """What a client needs to go from version ``base`` to version ``version``."""

    base: int
    version: int
    digest: bytes
    steps: tuple[Step, ...]


def pack_chain(chain: Chain) -> bytes:
    """Serialise ``chain`` (see the format above)."""
    if len(chain.digest) != 32:
        raise ValueError(f"digest must be 32 bytes, got {len(chain.digest)}")
    parts = [
        _HEAD.pack(_MAGIC, _VERSION, chain.base, chain.version, chain.digest, len(chain.steps))
    ]
    for s in chain.steps:
        parts.append(_STEP.pack(s.round, s.merge_key, len(s.updates)))
        for u in s.updates:
            parts.append(_UPDATE.pack(u.slot, u.key, u.weight, u.clip, len(u.payload)))
            parts.append(u.payload)
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def unpack_chain(blob: bytes) -> Chain:
    """Parse :func:`pack_chain`'s bytes, or raise :class:`DownlinkError` naming what is wrong."""
    if len(blob) < _HEAD.size + 4:
        raise DownlinkError(f"downlink chain of {len(blob)} bytes is shorter than its header")
    body, (crc,) = blob[:-4], struct.unpack("<I", blob[-4:])
    if zlib.crc32(body) != crc:
        raise DownlinkError("downlink chain CRC mismatch (corrupted in transit)")
    magic, version, base, ver, digest, n_steps = _HEAD.unpack_from(body, 0)
    if magic != _MAGIC or version != _VERSION:
        raise DownlinkError(
            f"not a version-{_VERSION} downlink chain (magic {magic!r}, v{version})"
        )
    off = _HEAD.size
    steps = []
    try:
        for _ in range(n_steps):
            rnd, merge_key, n_updates = _STEP.unpack_from(body, off)
            off += _STEP.size
            updates = []
            for _ in range(n_updates):
                slot, key, weight, clip, length = _UPDATE.unpack_from(body, off)
                off += _UPDATE.size
                if off + length > len(body):
                    raise DownlinkError(f"payload of slot {slot} in round {rnd} is truncated")
                updates.append(Update(slot, key, weight, clip, bytes(body[off : off + length])))
                off += length
            steps.append(Step(rnd, merge_key, tuple(updates)))
    except struct.error as e:
        raise DownlinkError(f"downlink chain is truncated: {e}") from None
    if off != len(body):
        raise DownlinkError(f"downlink chain has {len(body) - off} trailing bytes")
    if [s.round for s in steps] != list(range(base + 1, ver + 1)):
        raise DownlinkError(f"downlink chain from version {base} to {ver} lacks rounds")
    return Chain(base, ver, digest, tuple(steps))
