"""One Flower strategy for every combination of adapter, codec, merger and server optimizer.

The parts are injected, not subclassed (torchtune's composition over inheritance):

* ``configure_train`` samples nodes like FedAvg, then gives every node its own train message:
  the global adapter plus ``slot`` and ``key = H(run seed, round, slot)``. Clients cannot pick
  their keys, so they cannot pick their projection directions.
* ``aggregate_train`` validates every reply (Flower error, records, num-examples, the wire
  checks of the codec: version, layout hash, round, slot, key, CRC, finite values, an
  optional norm bound), drops the invalid ones with a logged reason, decodes the rest,
  merges them and applies the server optimizer. With fewer than ``min_valid`` valid replies
  the round keeps the previous global adapter and says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune import rng
from fedtune.downlink import Chain, History, Step, Update, state_digest
from fedtune.fl.downlink import DOWNLINK, chain_to_record
from fedtune.fl.records import (
    RESIDUAL,
    RecordError,
    key_to_config,
    metrics_record,
    record_to_payload,
    record_to_state,
    state_to_record,
)

Tensors = dict[str, torch.Tensor]
_MERGE_TAG = 0x3E26E  # separates the merger's round key from the clients' keys
_SAMPLE_TAG = 0x5A3B1E  # and the sampling key
FALLBACK_SLOT = 1 << 20  # slots of nodes that did not report a partition id


@dataclass
class RoundStats:
    """What one training round did, for the progress line, the JSONL file and tests."""

    round: int
    sampled: int = 0
    valid: int = 0
    dropped: dict[str, str] = field(default_factory=dict)  # node id -> reason
    train_loss: float = math.nan
    num_examples: int = 0
    bytes_up: int = 0  # sum over replies of the reply's ArrayRecord bytes
    bytes_down: int = 0  # sum over sent messages of the ArrayRecord bytes
    skipped: bool = False
    update_norm: float = 0.0
    chains: int = 0  # train messages that carried a payload chain instead of the dense adapter


class FedTuneStrategy(FedAvg):
    """FedAvg's sampling and message plumbing with fedtune's codec / merger / server opt."""

    def __init__(
        self,
        *,
        codec: Any,
        merger: Any,
        server_opt: Any,
        spec: Mapping[str, torch.Tensor],
        run_seed: int,
        min_valid: int = 1,
        clip: Any = None,
        direction_filter: Any = None,
        max_update_norm: float = 0.0,
        on_round: Callable[[RoundStats], None] | None = None,
        node_wait: float = 300.0,
        exact: Any = None,
        downlink: str = "dense",
        client_initial: bool = False,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(fraction_evaluate=0.0, **fedavg_kwargs)
        self.node_wait = node_wait
        self.slots: dict[int, int] = {}  # node id -> slot (its partition id), learned once
        self.codec = codec
        self.merger = merger
        self.server_opt = server_opt
        self.spec = dict(spec)
        self.run_seed = run_seed
        self.min_valid = min_valid
        self.clip = clip
        # merging.CosineFilter or None: drops updates that oppose the round's consensus
        self.direction_filter = direction_filter
        self.max_update_norm = max_update_norm
        self.on_round = on_round
        # factor-mode='exact': a fedtune.adapters.exact.ExactResidual holding the running
        # FedEx-LoRA residual of the frozen base weights; None in the other modes
        self.exact = exact
        self.current: Tensors = {}
        self.issued: dict[int, tuple[int, int]] = {}  # node id -> (slot, key) of this round
        # downlink = 'payloads' / 'auto': past rounds' payloads and what each slot holds;
        # client_initial: clients can build version 0 (the keyed initial adapter) themselves
        self.downlink = History(downlink, client_initial=client_initial)
        self.slot_bytes: dict[int, list[int]] = {}  # slot -> [bytes up, bytes down], whole run
        self._dense_bytes = 0  # bytes of the dense adapter record (auto mode prunes with it)
        self.history: list[RoundStats] = []
        self._stats = RoundStats(0)

    # ------------------------------------------------------------------ configure
    def client_key(self, server_round: int, slot: int) -> int:
        """The key the server issues to client ``slot`` in ``server_round``."""
        return rng.derive_key(self.run_seed, server_round, slot)

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Connected node ids, waiting at most ``node_wait`` s for ``min_available_nodes``.

        Flower's own ``sample_nodes`` polls without an upper bound; a run must never hang.
        """
        deadline = time.monotonic() + self.node_wait
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.min_available_nodes or time.monotonic() >= deadline:
                return nodes
            time.sleep(0.5)

    def identify(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes not seen before for their partition id (a 'query' message), once.

        Keys are issued per *slot*, and the slot is the node's partition id: it is stable
        across restarts (node ids are not), which makes a resumed run bit-identical.
        Nodes that do not answer, or claim an id another node already holds, get a slot
        from ``FALLBACK_SLOT`` upwards by node-id rank.
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
            if isinstance(pid, int) and not isinstance(pid, bool) and 0 <= pid < FALLBACK_SLOT:
                claimed[reply.metadata.src_node_id] = pid
        taken = set(self.slots.values())
        counts: dict[int, int] = {}
        for pid in claimed.values():
            counts[pid] = counts.get(pid, 0) + 1
        fallback = FALLBACK_SLOT + len(self.slots)
        for n in unknown:
            pid = claimed.get(n)
            if pid is not None and counts[pid] == 1 and pid not in taken:
                self.slots[n] = pid
            else:
                self.slots[n] = fallback
                fallback += 1
                log(WARNING, "node %s gave no unique partition id; using slot %d", n, self.slots[n])

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
        self.identify(grid, nodes)
        # keyed, reproducible sampling in slot order (Flower's sample_nodes uses random.sample)
        by_slot = sorted(nodes, key=lambda n: self.slots[n])
        k = min(len(by_slot), max(int(len(by_slot) * self.fraction_train), self.min_train_nodes))
        if k < len(by_slot):
            pick = rng.choice(
                rng.derive_key(self.run_seed, server_round, _SAMPLE_TAG), 0, len(by_slot), k
            )
            by_slot = [by_slot[i] for i in sorted(pick.tolist())]
        self.issued = {}
        messages = []
        down = arrays.count_bytes()
        extra = self._residual_records()
        down += sum(r.count_bytes() for r in extra.values())
        dense = self._dense_bytes = arrays.count_bytes()
        digest = state_digest(self.current) if self.downlink.mode != "dense" else b""
        total_down = chains = 0
        for node_id in by_slot:
            slot = self.slots[node_id]
            key = self.client_key(server_round, slot)
            self.issued[node_id] = (slot, key)
            cfg = ConfigRecord(dict(config))
            cfg["server-round"] = server_round
            cfg["slot"] = slot
            cfg["key"] = key_to_config(key)
            state_rec, n_state = self._state_record(slot, server_round - 1, arrays, dense, digest)
            chains += DOWNLINK in state_rec
            total_down += down - dense + n_state
            self.slot_bytes.setdefault(slot, [0, 0])[1] += down - dense + n_state
            messages.append(
                Message(
                    content=RecordDict({**state_rec, "config": cfg, **extra}),
                    message_type=MessageType.TRAIN,
                    dst_node_id=node_id,
                )
            )
        self._stats = RoundStats(
            server_round, sampled=len(messages), bytes_down=total_down, chains=chains
        )
        log(INFO, "round %d: sampled %d of %d nodes", server_round, len(messages), len(nodes))
        return messages

    # ------------------------------------------------------------------ aggregate
    def decode_reply(self, server_round: int, msg: Message) -> tuple[Tensors, float, float]:
        """(delta, weight, train loss) of one reply, or ValueError saying why it is invalid."""
        if msg.has_error():
            raise ValueError(f"client error: {msg.error.reason}")
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
        delta = self.codec.decode(payload, like=self.spec, key=key, round=server_round, slot=slot)
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))
        if not math.isfinite(norm):
            raise ValueError("decoded update is not finite")
        if self.max_update_norm > 0 and norm > self.max_update_norm:
            raise ValueError(f"update norm {norm:.4g} exceeds the bound {self.max_update_norm:.4g}")
        return delta, float(n), float(loss) if isinstance(loss, int | float) else math.nan

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from fedtune import merging

        stats = self._stats if self._stats.round == server_round else RoundStats(server_round)
        accepted: list[tuple[int, Tensors, float, float]] = []  # (slot, delta, weight, loss)
        payloads: dict[int, bytes] = {}  # slot -> accepted payload (compact downlink only)
        answered: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            self._track_delivery(server_round, node, msg, answered)
            try:
                if not msg.has_error() and "arrays" in msg.content.array_records:
                    up = msg.content.array_records["arrays"].count_bytes()
                    stats.bytes_up += up
                    if node in self.issued:
                        self.slot_bytes.setdefault(self.issued[node][0], [0, 0])[0] += up
                delta, w, loss = self.decode_reply(server_round, msg)
            except (
                ValueError,
                KeyError,
                TypeError,
            ) as e:  # PayloadError / RecordError are ValueErrors
                reason = f"{type(e).__name__}: {e}"
                stats.dropped[str(node)] = reason
                log(WARNING, "round %d: dropped reply from node %s: %s", server_round, node, reason)
                continue
            accepted.append((self.issued[node][0], delta, w, loss))
            if self.downlink.mode != "dense":
                arrays_rec = msg.content.array_records["arrays"]
                payloads[self.issued[node][0]] = record_to_payload(arrays_rec)
        if self.downlink.mode != "dense":  # no reply: what that client holds is unknown
            for node in set(self.issued) - answered:
                self.downlink.failed(self.issued[node][0])
        # merge in slot order: arrival order varies between runs, the result must not
        accepted.sort(key=lambda a: a[0])
        if self.clip is not None and self.clip.reject:
            accepted = self._reject_oversized(server_round, accepted, stats)
        if self.direction_filter is not None:
            accepted = self._filter_directions(server_round, accepted, stats)
        deltas = [a[1] for a in accepted]
        weights = [a[2] for a in accepted]
        losses = [a[3] for a in accepted]
        stats.valid = len(deltas)
        if stats.valid:
            stats.num_examples = int(sum(weights))
            finite = [(lo, w) for lo, w in zip(losses, weights, strict=True) if math.isfinite(lo)]
            if finite:
                stats.train_loss = sum(lo * w for lo, w in finite) / sum(w for _, w in finite)
        if stats.valid < self.min_valid:
            stats.skipped = True
            self._record_step(server_round, [], {}, [], [])  # the state is kept
            log(
                WARNING,
                "round %d: only %d valid replies (< %d): keeping the previous global adapter",
                server_round,
                stats.valid,
                self.min_valid,
            )
            self._finish(stats)
            return None, self._metrics(stats)
        round_key = rng.derive_key(self.run_seed, server_round, _MERGE_TAG)
        self._record_step(server_round, [a[0] for a in accepted], payloads, weights, deltas)
        clip = self.clip
        if self.exact is not None and clip is not None:
            # exact mode needs the client factors exactly as merged: clip once, here
            bound = clip.for_round(deltas)
            deltas, clip = [bound(d) for d in deltas], None
        merged = merging.aggregate(self.merger, deltas, weights, clip=clip, key=round_key)
        stats.update_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in merged.values()))
        new_state = self.server_opt.step(self.current, merged)
        if self.exact is not None:  # FedEx-LoRA: fold Σ w B_k A_k − B̄Ā into the base
            r_norm = self.exact.update(self.current, deltas, weights, new_state)
            log(INFO, "round %d: exact-mode residual increment norm %.4g", server_round, r_norm)
        self._finish(stats)
        return state_to_record(new_state), self._metrics(stats)

    def _reject_oversized(
        self,
        server_round: int,
        accepted: list[tuple[int, Tensors, float, float]],
        stats: RoundStats,
    ) -> list[tuple[int, Tensors, float, float]]:
        """Drop the valid replies whose norm is over ``clip-reject`` x the round's clip bound."""
        assert self.clip is not None
        reject = self.clip.reject
        out = {
            i: f"norm {n:.4g} is {n / bound:.3g}x the round's clip bound {bound:.4g} "
            f"(clip-reject {reject:g})"
            for i, n, bound in self.clip.oversized([a[1] for a in accepted])
        }
        return self._drop(server_round, accepted, out, stats)

    def _filter_directions(
        self,
        server_round: int,
        accepted: list[tuple[int, Tensors, float, float]],
        stats: RoundStats,
    ) -> list[tuple[int, Tensors, float, float]]:
        """Drop the valid replies the direction filter rejects, each with a logged reason."""
        slots = [a[0] for a in accepted]
        scored = dict(self.direction_filter.outliers([a[1] for a in accepted], slots))
        if self.direction_filter.last_scores:  # every score, so a false drop can be traced
            shown = ", ".join(
                f"{slot}: {x:.3f}"
                for slot, x in zip(slots, self.direction_filter.last_scores, strict=True)
            )
            log(INFO, "round %d: direction scores by slot: %s", server_round, shown)
        what = "mean cosine over its rounds" if self.direction_filter.memory else "cosine"
        out = {
            i: f"direction filter: {what} {cos:.3f} with the other clients' median direction "
            f"is below {self.direction_filter.threshold:g} and an outlier this round"
            for i, cos in scored.items()
        }
        return self._drop(server_round, accepted, out, stats)

    def _drop(
        self,
        server_round: int,
        accepted: list[tuple[int, Tensors, float, float]],
        out: dict[int, str],
        stats: RoundStats,
    ) -> list[tuple[int, Tensors, float, float]]:
        """``accepted`` without the entries of ``out`` (index -> reason), each drop logged and
        counted in the round's stats under its node id."""
        if not out:
            return accepted
        node_of = {slot: node for node, (slot, _) in self.issued.items()}
        for i, reason in sorted(out.items()):
            slot = accepted[i][0]
            stats.dropped[str(node_of.get(slot, f"slot {slot}"))] = reason
            log(WARNING, "round %d: dropped update of slot %d: %s", server_round, slot, reason)
        return [a for i, a in enumerate(accepted) if i not in out]

    def _residual_records(self) -> dict[str, ArrayRecord]:
        """Exact mode: the dense residual (``Σ d_out·d_in`` fp32 per message), else nothing."""
        if self.exact is None or not self.exact.residual:
            return {}  # no record = zero residual: the client restores its original weights
        return {RESIDUAL: state_to_record(self.exact.residual)}

    # ------------------------------------------------------------------ downlink
    def _state_record(
        self, slot: int, version: int, arrays: ArrayRecord, dense: int, digest: bytes
    ) -> tuple[dict[str, ArrayRecord], int]:
        """The global-state part of a train message and its bytes: the dense adapter, or with
        ``downlink='payloads'`` / ``'auto'`` the chain of rounds the slot has not seen."""
        found = self.downlink.chain(slot, version)
        if found is not None:
            base, steps = found
            rec = chain_to_record(Chain(base, version, digest, tuple(steps)))
            n = rec.count_bytes()
            if self.downlink.mode == "payloads" or n < dense:
                return {DOWNLINK: rec}, n
        return {"arrays": arrays}, dense

    def _track_delivery(self, server_round: int, node: int, msg: Message, seen: set[int]) -> None:
        """A reply without error means the client stored version ``server_round - 1``; an
        error (a failed rebuild among them) means it gets the dense adapter next time."""
        if node not in self.issued or self.downlink.mode == "dense":
            return
        seen.add(node)
        slot = self.issued[node][0]
        if msg.has_error():
            self.downlink.failed(slot)
        else:
            self.downlink.delivered(slot, server_round - 1)

    def _record_step(
        self,
        server_round: int,
        slots: list[int],
        payloads: dict[int, bytes],
        weights: list[float],
        deltas: list[Tensors],
    ) -> None:
        """Remember what this round applies (accepted payloads in slot order, their keys,
        weights and the clip factors the merge used) so clients can replay it."""
        if self.downlink.mode == "dense":
            return
        factors = [1.0] * len(deltas)
        if self.clip is not None and deltas:
            # the same bound and factors aggregate() applies (same process, same arithmetic)
            bound = self.clip.for_round(deltas)
            factors = [bound.factor(d) for d in deltas]
        updates = tuple(
            Update(slot, self.client_key(server_round, slot), w, f, payloads[slot])
            for slot, w, f in zip(slots, weights, factors, strict=True)
        )
        merge_key = rng.derive_key(self.run_seed, server_round, _MERGE_TAG)
        self.downlink.record(Step(server_round, merge_key, updates))
        self.downlink.prune(self._dense_bytes)

    def byte_totals(self) -> dict[int, tuple[int, int]]:
        """Slot -> (bytes up, bytes down) over the whole run, for the run summary."""
        return {s: (u, d) for s, (u, d) in sorted(self.slot_bytes.items())}

    def _finish(self, stats: RoundStats) -> None:
        self.history.append(stats)
        if self.on_round is not None:
            self.on_round(stats)

    @staticmethod
    def _metrics(stats: RoundStats) -> MetricRecord:
        m: dict[str, int | float] = {
            "valid-replies": stats.valid,
            "dropped-replies": len(stats.dropped),
            "num-examples": stats.num_examples,
            "bytes-up": stats.bytes_up,
            "bytes-down": stats.bytes_down,
        }
        if math.isfinite(stats.train_loss):
            m["train-loss"] = stats.train_loss
        return metrics_record(m)

    def summary(self) -> None:
        log(
            INFO,
            "\t├── fedtune: codec=%s merger=%s server-opt=%s min-valid=%d",
            type(self.codec).__name__,
            type(self.merger).__name__,
            type(self.server_opt).__name__,
            self.min_valid,
        )
        log(INFO, "\t├── fedtune: downlink=%s", self.downlink.mode)
        super().summary()

    def log_byte_totals(self) -> None:
        """Per-client (slot) uplink / downlink totals of the run, one line per slot."""
        for slot, (up, down) in self.byte_totals().items():
            log(INFO, "fedtune: slot %d: %d bytes up, %d bytes down", slot, up, down)

    # ------------------------------------------------------------------ the loop
    def _log_missing(self, server_round: int, replies: list[Message], timeout: float) -> None:
        """Name the sampled nodes that did not answer within ``timeout`` (hung, slow or gone)."""
        answered = {m.metadata.src_node_id for m in replies}
        missing = sorted(n for n in self.issued if n not in answered)
        if missing:
            log(
                WARNING,
                "round %d: no reply within round-timeout=%.0f s from %d of %d sampled nodes "
                "(slots %s); going on without them",
                server_round,
                timeout,
                len(missing),
                len(self.issued),
                ", ".join(str(self.issued[n][0]) for n in missing),
            )

    def run(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        *,
        first_round: int,
        num_rounds: int,
        timeout: float,
        evaluate_fn: Callable[[int, ArrayRecord], Any] | None = None,
        after_round: Callable[[int, ArrayRecord], None] | None = None,
    ) -> ArrayRecord:
        """Rounds ``first_round..num_rounds``: train, aggregate, evaluate, checkpoint.

        Flower's ``Strategy.start`` always begins at round 1; resuming needs a loop that can
        begin anywhere, so we run the same steps ourselves (no client-side evaluation: the
        server evaluates on the held-out split).
        """
        if first_round == 1 and evaluate_fn is not None:
            evaluate_fn(0, arrays)
        for rnd in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
            messages = list(self.configure_train(rnd, arrays, ConfigRecord({}), grid))
            replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
            self._log_missing(rnd, replies, timeout)
            new, _ = self.aggregate_train(rnd, replies)
            if new is not None:
                arrays = new
            if evaluate_fn is not None:
                evaluate_fn(rnd, arrays)
            if after_round is not None:
                after_round(rnd, arrays)
        self.log_byte_totals()
        return arrays
