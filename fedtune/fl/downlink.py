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
from fedtune.downlink import Chain, DownlinkError, pack_chain, rebuild, unpack_chain
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
    from fedtune import merging, pipeline

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
            codec=pipeline.build_codec(cfg, salt=pipeline.layout_salt(cfg)),
            merger=merging.get(cfg.merger, **dict(cfg.merger_options)),
            server_opt=merging.get_server_opt(cfg.server_opt, **dict(cfg.server_opt_options)),
        )
    if cfg.downlink != "dense":
        context.state[_STATE] = state_to_record(state)
        context.state[_META] = ConfigRecord({"version": config_int(config, "server-round") - 1})
    return state, config
