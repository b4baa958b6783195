"""Flower side of the compact downlink (:mod:`fedtune.downlink` holds the logic).

A train message carries either the dense global adapter (the ``arrays`` ArrayRecord, as with
``downlink = "dense"``) or a packed :class:`~fedtune.downlink.Chain` as ONE uint8 array in the
``downlink`` ArrayRecord, so ``ArrayRecord.count_bytes()`` accounts for what was really sent.
The client keeps the last global state it trained from in ``context.state`` (ArrayRecord
``downlink-state`` plus ConfigRecord ``downlink-meta`` with its version = round − 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from fedtune.config import Config
from fedtune.downlink import (
    Chain,
    DownlinkError,
    History,
    Step,
    pack_chain,
    rebuild,
    unpack_chain,
)
from fedtune.fl.records import (
    RecordError,
    config_int,
    payload_to_record,
    record_to_payload,
    record_to_state,
    state_to_record,
    train_inputs,
)

Tensors = dict[str, torch.Tensor]
DOWNLINK = "downlink"  # RecordDict key of a chain (the dense state keeps the key "arrays")
_STATE, _META = "downlink-state", "downlink-meta"


def chain_to_record(chain: Chain) -> ArrayRecord:
    """The chain as one uint8 array (one npy header, unlike an array per payload)."""
    return payload_to_record(pack_chain(chain))


def _keyed_initial(cfg: Config) -> Tensors:
    """Version 0: the keyed initial adapter this client builds anyway to train."""
    from fedtune import pipeline

    return pipeline.workbench(cfg, pipeline.federation(cfg)).initial


def _base_state(context: Context, base: int, initial: Callable[[], Tensors]) -> Tensors:
    """The state of version ``base``: the stored one, or for version 0 the keyed initial."""
    held = None
    if _META in context.state.config_records and _STATE in context.state.array_records:
        v = context.state.config_records[_META].get("version")
        held = v if isinstance(v, int) and not isinstance(v, bool) else None
        if held == base:
            return record_to_state(context.state.array_records[_STATE])
    if base == 0:
        return initial()
    raise DownlinkError(
        f"the server sent a chain from global version {base}, but this client holds "
        f"{'version ' + str(held) if held is not None else 'no global state'}"
    )


def receive(
    msg: Message,
    context: Context,
    cfg: Config,
    initial: Callable[[], Tensors] | None = None,
) -> tuple[Tensors, ConfigRecord]:
    """The global adapter and the train config of a train message, dense or rebuilt.

    A chain is rebuilt with the run's codec / merger / server optimizer and checked against
    the server's digest (:class:`~fedtune.downlink.DownlinkError` on mismatch: the reply is
    then an error and the server sends this client the dense state next time). With
    ``cfg.downlink != "dense"`` the state is stored in ``context.state`` for the next round.
    """
    from fedtune import parts, pipeline

    content = msg.content
    if DOWNLINK not in content.array_records:
        state, config = train_inputs(msg)
    else:
        if "config" not in content.config_records:
            raise RecordError("train message lacks the 'config' record")
        config = content.config_records["config"]
        chain = unpack_chain(record_to_payload(content.array_records[DOWNLINK]))
        if chain.version != config_int(config, "server-round") - 1:
            raise DownlinkError(
                f"chain ends at version {chain.version}, but round "
                f"{config_int(config, 'server-round')} trains from version "
                f"{config_int(config, 'server-round') - 1}"
            )
        base = _base_state(context, chain.base, initial or (lambda: _keyed_initial(cfg)))
        state = rebuild(
            base,
            chain.steps,
            chain.digest,
            codec=pipeline.codec(cfg),
            merger=parts.merger(cfg),
            server_opt=parts.server_opt(cfg),
        )
    if cfg.downlink != "dense":
        context.state[_STATE] = state_to_record(state)
        context.state[_META] = ConfigRecord({"version": config_int(config, "server-round") - 1})
    return state, config


class Sender:
    """Server side of the compact downlink: what each train message carries, and what each
    slot holds after the round (its reply, or its silence, says so)."""

    def __init__(self, mode: str, *, client_initial: bool = False) -> None:
        self.history = History(mode, client_initial=client_initial)
        self.dense_bytes = 0  # bytes of the dense adapter record (auto mode prunes with it)

    @property
    def mode(self) -> str:
        return self.history.mode

    def state_record(
        self, slot: int, version: int, arrays: ArrayRecord, digest: bytes
    ) -> tuple[dict[str, ArrayRecord], int]:
        """The global-state part of a train message and its bytes: the dense adapter, or with
        ``downlink='payloads'`` / ``'auto'`` the chain of rounds the slot has not seen."""
        found = self.history.chain(slot, version)
        if found is not None:
            base, steps = found
            rec = chain_to_record(Chain(base, version, digest, tuple(steps)))
            n = rec.count_bytes()
            if self.mode == "payloads" or n < self.dense_bytes:
                return {DOWNLINK: rec}, n
        return {"arrays": arrays}, self.dense_bytes

    def track(self, slot: int, ok: bool, server_round: int) -> None:
        """A reply without error means the client stored version ``server_round - 1``; an
        error (a failed rebuild among them) or no reply means it gets the dense adapter next."""
        if ok:
            self.history.delivered(slot, server_round - 1)
        else:
            self.history.failed(slot)

    def record(self, step: Step) -> None:
        """Remember what a round applied, so clients can replay it."""
        self.history.record(step)
        self.history.prune(self.dense_bytes)
