"""Flower plumbing around the one server round (:class:`fedtune.round.ServerRound`).

* ``configure_train`` samples nodes (:func:`fedtune.round.sample`, keyed), then gives every
  node its own train message: the global adapter (or a payload chain, docs/downlink.md) plus
  ``slot`` and ``key = H(run seed, round, slot)``. Clients cannot pick their keys, so they
  cannot pick their projection directions.
* ``aggregate_train`` turns each reply into a :class:`fedtune.round.Update` (Flower error,
  records, num-examples, every wire check of the codec), drops the invalid ones with a logged
  reason, and hands the rest to the round. The round itself — screens, clip, merge, server
  optimizer, exact residual — is not written here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune import round as rnd_
from fedtune.downlink import Step, state_digest
from fedtune.downlink import Update as ReplayUpdate
from fedtune.fl.downlink import DOWNLINK, Sender
from fedtune.fl.records import (
    RESIDUAL,
    RecordError,
    key_to_config,
    one_line,
    record_to_payload,
    record_to_state,
    state_to_record,
)
from fedtune.fl.stats import RoundStats, stats_metrics
from fedtune.privacy.settings import PrivateRun

Tensors = dict[str, torch.Tensor]
FALLBACK_SLOT = 1 << 20  # slots of nodes that did not report a partition id
# identify-nodes='auto': ask every node its partition id (restart-stable sampling) up to this many
# connected nodes; above it only the sampled ones (one query costs ~0.1 s a node in simulation)
AUTO_IDENTIFY_ALL = 256


class FedTuneStrategy(FedAvg):
    """FedAvg's sampling and message plumbing around fedtune's codec and server round."""

    def __init__(
        self,
        *,
        codec: Any,
        server_round: rnd_.ServerRound,
        spec: Mapping[str, torch.Tensor],
        run_seed: int,
        max_update_norm: float = 0.0,
        on_round: Callable[[RoundStats], None] | None = None,
        node_wait: float = 300.0,
        downlink: str = "dense",
        client_initial: bool = False,
        private: PrivateRun | None = None,
        identify_nodes: str = "auto",
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(fraction_evaluate=0.0, **fedavg_kwargs)
        self.codec = codec
        self.round = server_round
        self.spec = dict(spec)
        self.run_seed = run_seed
        self.max_update_norm = max_update_norm
        self.on_round = on_round
        self.node_wait = node_wait
        self.slots: dict[int, int] = {}  # node id -> slot (its partition id), learned once
        self.issued: dict[int, tuple[int, int]] = {}  # node id -> (slot, key) of this round
        self.downlink = Sender(downlink, client_initial=client_initial)
        self.slot_bytes: dict[int, list[int]] = {}  # slot -> [bytes up, bytes down], whole run
        self.current: Tensors = {}
        self.history: list[RoundStats] = []
        self._stats = RoundStats(0)
        self.private = private if private is not None else PrivateRun()
        if identify_nodes not in ("auto", "all", "sampled"):
            raise ValueError(
                f"identify_nodes must be 'auto', 'all' or 'sampled', got {identify_nodes!r}"
            )
        self.identify_nodes = identify_nodes

    def new_stats(self, server_round: int) -> RoundStats:
        """This round's stats (begun by configure_train)."""
        return self._stats if self._stats.round == server_round else RoundStats(server_round)

    # ------------------------------------------------------------------ configure
    def client_key(self, server_round: int, slot: int) -> int:
        return rnd_.client_key(self.run_seed, server_round, slot)

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Connected node ids, waiting at most ``node_wait`` s for ``min_available_nodes``
        (Flower's own ``sample_nodes`` polls without an upper bound; a run must never hang)."""
        deadline = time.monotonic() + self.node_wait
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.min_available_nodes or time.monotonic() >= deadline:
                return nodes
            time.sleep(0.5)

    def identify(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes not seen before for their partition id (a 'query' message), once.

        Keys are issued per *slot*, and the slot is the node's partition id: it is stable
        across restarts (node ids are not), which makes a resumed run bit-identical. Nodes
        that do not answer, or claim an id another node holds, get a slot from
        ``FALLBACK_SLOT`` upwards by node-id rank.
        """
        unknown = [n for n in node_ids if n not in self.slots]
        if not unknown:
            return
        msgs = [
            Message(content=RecordDict({}), message_type=MessageType.QUERY, dst_node_id=n)
            for n in unknown
        ]
        claimed: dict[int, int] = {}
        for reply in grid.send_and_receive(msgs, timeout=self.node_wait):
            if reply.has_error() or "identity" not in reply.content.metric_records:
                continue
            pid = reply.content.metric_records["identity"].get("partition-id")
            if isinstance(pid, int) and not isinstance(pid, bool):
                claimed[reply.metadata.src_node_id] = pid
        for n, slot in rnd_.assign_slots(self.slots, unknown, claimed, FALLBACK_SLOT).items():
            self.slots[n] = slot
            if slot >= FALLBACK_SLOT:
                log(WARNING, "node %s gave no unique partition id; using slot %d", n, slot)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = record_to_state(arrays)
        nodes = self.wait_for_nodes(grid)
        self._stats = RoundStats(server_round)
        if len(nodes) < self.min_available_nodes:
            log(
                WARNING,
                "round %d: only %d of the %d required nodes are connected after %.0f s",
                server_round,
                len(nodes),
                self.min_available_nodes,
                self.node_wait,
            )
            return []
        lazy = self.identify_nodes == "sampled" or (
            self.identify_nodes == "auto" and len(nodes) > AUTO_IDENTIFY_ALL
        )
        if lazy:
            order = nodes  # node-id order: no node is asked anything before it is sampled
        else:
            self.identify(grid, nodes)  # once per node: sampling is by slot (partition id)
            order = sorted(nodes, key=lambda n: self.slots[n])
        picks = rnd_.sample(
            self.run_seed,
            server_round,
            len(order),
            self.fraction_train,
            self.min_train_nodes,
            poisson=self.private.poisson,
        )
        chosen = [order[i] for i in picks]
        if lazy:
            self.identify(grid, chosen)  # the keys are still per slot
        private = self.private.client_config(self.round.dp, len(picks))
        residual = self.round.residual  # exact mode: the dense residual goes with every message
        extra = {RESIDUAL: state_to_record(residual)} if residual else {}
        extra_bytes = sum(r.count_bytes() for r in extra.values())
        self.downlink.dense_bytes = arrays.count_bytes()
        digest = state_digest(self.current) if self.downlink.mode != "dense" else b""
        self.issued, messages = {}, []
        for node_id in chosen:
            slot = self.slots[node_id]
            key = self.client_key(server_round, slot)
            self.issued[node_id] = (slot, key)
            cfg = ConfigRecord(dict(config))
            cfg["server-round"], cfg["slot"], cfg["key"] = server_round, slot, key_to_config(key)
            for k, v in private.items():
                cfg[k] = v
            state_rec, n_state = self.downlink.state_record(slot, server_round - 1, arrays, digest)
            self._stats.chains += DOWNLINK in state_rec
            self._stats.bytes_down += extra_bytes + n_state
            self.slot_bytes.setdefault(slot, [0, 0])[1] += extra_bytes + n_state
            content = RecordDict({**state_rec, "config": cfg, **extra})
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)
            )
        self._stats.sampled = len(messages)
        log(INFO, "round %d: sampled %d of %d nodes", server_round, len(messages), len(nodes))
        return messages

    # ------------------------------------------------------------------ aggregate
    def decode_reply(self, server_round: int, msg: Message) -> rnd_.Update:
        """The update of one reply, or ValueError saying why it is invalid."""
        if msg.has_error():
            raise ValueError(f"client error: {one_line(msg.error.reason)}")
        node = msg.metadata.src_node_id
        if node not in self.issued:
            raise ValueError("reply from a node that was not sent a train message this round")
        slot, key = self.issued[node]
        content = msg.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            raise RecordError("reply lacks the 'arrays' ArrayRecord or the 'metrics' MetricRecord")
        metrics = content.metric_records["metrics"]
        n = metrics.get("num-examples")
        if not isinstance(n, int | float) or isinstance(n, bool) or not math.isfinite(n) or n <= 0:
            raise ValueError(f"num-examples must be a positive number, got {n!r}")
        loss = metrics.get("train-loss", math.nan)
        payload = record_to_payload(content.array_records["arrays"])
        delta = rnd_.decode(
            self.codec,
            payload,
            self.spec,
            key=key,
            server_round=server_round,
            slot=slot,
            max_norm=self.max_update_norm,
        )
        loss = float(loss) if isinstance(loss, int | float) else math.nan
        bit = metrics.get("dp-clip-bit", math.nan)  # distributed DP, adaptive clipping
        bit = float(bit) if isinstance(bit, int | float) else math.nan
        return rnd_.Update(slot, delta, float(n), loss, payload, clip_bit=bit)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.new_stats(server_round)
        updates: list[rnd_.Update] = []
        answered: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if node in self.issued:
                answered.add(node)
                if self.downlink.mode != "dense":
                    self.downlink.track(self.issued[node][0], not msg.has_error(), server_round)
            try:
                if not msg.has_error() and "arrays" in msg.content.array_records:
                    up = msg.content.array_records["arrays"].count_bytes()
                    stats.bytes_up += up
                    if node in self.issued:
                        self.slot_bytes.setdefault(self.issued[node][0], [0, 0])[0] += up
                updates.append(self.decode_reply(server_round, msg))
            except (ValueError, KeyError, TypeError) as e:  # PayloadError, RecordError too
                reason = f"{type(e).__name__}: {e}"
                stats.dropped[str(node)] = reason
                log(WARNING, "round %d: dropped reply from node %s: %s", server_round, node, reason)
        if self.downlink.mode != "dense":  # no reply: what that client holds is unknown
            for node in set(self.issued) - answered:
                self.downlink.track(self.issued[node][0], False, server_round)
        res = self.round(server_round, self.current, updates, sampled=len(self.issued))
        return self.finish_round(server_round, res, stats)

    def finish_round(
        self, server_round: int, res: rnd_.RoundResult, stats: RoundStats
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Log what the round did, keep its stats, and return the next global adapter."""
        node_of = {slot: node for node, (slot, _) in self.issued.items()}
        for slot, reason in res.dropped:
            stats.dropped[str(node_of.get(slot, f"slot {slot}"))] = reason
            log(WARNING, "round %d: dropped update of slot %d: %s", server_round, slot, reason)
        for note in res.notes:
            log(WARNING if res.skipped else INFO, "round %d: %s", server_round, note)
        stats.valid, stats.num_examples = len(res.applied), res.num_examples
        stats.train_loss, stats.update_norm, stats.skipped = (
            res.train_loss,
            res.update_norm,
            res.skipped,
        )
        stats.privacy = dict(res.privacy)
        if self.downlink.mode != "dense":
            self.downlink.record(self._replay_step(res))
        self.history.append(stats)
        if self.on_round is not None:
            self.on_round(stats)
        new = None if res.skipped else state_to_record(res.state)
        return new, stats_metrics(stats)

    def _replay_step(self, res: rnd_.RoundResult) -> Step:
        """What the round applied, as clients replay it (payloads, keys, weights, clip factors);
        a skipped round applied nothing."""
        if res.skipped:
            return Step(res.round, res.merge_key, ())
        updates = tuple(
            ReplayUpdate(u.slot, self.client_key(res.round, u.slot), u.weight, f, u.payload)
            for u, f in zip(res.applied, res.factors, strict=True)
        )
        return Step(res.round, res.merge_key, updates)

    def byte_totals(self) -> dict[int, tuple[int, int]]:
        """Slot -> (bytes up, bytes down) over the whole run, for the run summary."""
        return {s: (u, d) for s, (u, d) in sorted(self.slot_bytes.items())}

    def summary(self) -> None:
        r = self.round
        names = (type(self.codec).__name__, type(r.merger).__name__, type(r.server_opt).__name__)
        log(INFO, "\t├── fedtune: codec=%s merger=%s server-opt=%s", *names)
        log(INFO, "\t├── fedtune: min-valid=%d downlink=%s", r.min_valid, self.downlink.mode)
        super().summary()
