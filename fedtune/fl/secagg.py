"""Flower's SecAgg+ under fedtune's Message-API strategy: the server learns only the sum.

Flower 1.42 ships SecAgg+ as ``flwr.server.workflow.SecAggPlusWorkflow`` (server) and
``flwr.client.mod.secaggplus_mod`` (client), written for the legacy path: the workflow's
``__call__`` insists on a ``LegacyContext`` whose legacy ``Strategy`` provides
``configure_fit`` / ``aggregate_fit`` and a ``ClientManager``, and the mod reads the ClientApp's
reply as a legacy ``FitRes``. fedtune keeps Flower's protocol and cryptography unchanged and
adapts only that plumbing:

* :func:`secure_round` runs the workflow's four stages itself (``setup_stage``,
  ``share_keys_stage``, ``collect_masked_vectors_stage``, ``unmask_stage``; the same order
  and the same threshold checks as ``SecAggPlusWorkflow.__call__``) with a small duck-typed
  context: its ``configure_fit`` names the nodes fedtune's strategy sampled, and the message
  each node trains on is fedtune's own train message (adapter, slot, key, DP config); its
  ``aggregate_fit`` only receives the unmasked weighted mean, which becomes a
  :class:`fedtune.round.SecureSum` for the one server round.
* :func:`maybe_secaggplus` is the ClientApp mod: it hands TRAIN messages that carry SecAgg+
  stage configs to Flower's ``secaggplus_mod`` and everything else straight to the app, so one
  ClientApp serves runs with and without SecAgg.
* :func:`secure_reply` is the reply of fedtune's train handler under SecAgg: the vector
  ``[u, b·c/4]`` (:func:`fedtune.privacy.client.secure_vector`) as a legacy FitRes, which the
  mod quantizes (``±c`` onto 2^22 levels), masks and sends instead.

A node that drops during a stage is tolerated while every sampled node keeps at least
``threshold`` live neighbours (Flower's check); otherwise the workflow halts, ``secure_round``
returns None and the round applies nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
    SecAggPlusWorkflow,
    WorkflowState,
)
from flwr.serverapp import Grid

from fedtune import round as rnd_
from fedtune.privacy import secure

# --------------------------------------------------------------------------- client side


def is_secure(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and (
        RECORD_KEY_CONFIGS in msg.content.config_records
    )


def maybe_secaggplus(msg: Message, ctxt: Any, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: Flower's ``secaggplus_mod`` for SecAgg+ train messages, else pass-through."""
    if is_secure(msg):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def secure_reply(vector: torch.Tensor, weight: float, metrics: dict[str, float]) -> RecordDict:
    """The train handler's reply under SecAgg+, in the legacy FitRes form the mod reads."""
    arr = vector.detach().to("cpu", torch.float64).numpy()
    res = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters([arr]),
        num_examples=max(1, round(weight)),
        metrics={k: float(v) for k, v in metrics.items()},
    )
    return compat.fitres_to_recorddict(res, keep_input=False)


# --------------------------------------------------------------------------- server side


@dataclass
class _Proxy:
    node_id: int


@dataclass
class _Strategy:
    """The two legacy-strategy calls the workflow's stages make."""

    nodes: list[int]
    results: list[tuple[Any, FitRes]] = field(default_factory=list)

    def configure_fit(self, server_round: int, parameters: Parameters, cm: Any) -> list[Any]:
        return [(_Proxy(n), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> tuple[None, dict]:
        self.results = list(results)
        return None, {}  # nothing written back: fedtune's round applies the sum


@dataclass
class _ClientManager:
    n: int

    def num_available(self) -> int:
        return self.n


@dataclass
class _Context:
    state: RecordDict
    strategy: _Strategy
    client_manager: _ClientManager


@dataclass
class SecureResult:
    """What :func:`secure_round` learned: the sum (or None) and how many messages it took."""

    total: rnd_.SecureSum | None
    contributors: list[int] = field(default_factory=list)  # node ids
    stages: int = 0


def workflow(
    *, threshold: float, clip_range: float, max_weight: float, timeout: float
) -> SecAggPlusWorkflow:
    """Flower's workflow with fedtune's settings (every node shares with every other)."""
    return SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=threshold,
        max_weight=max_weight,
        clipping_range=clip_range,
        quantization_range=secure.TARGET_RANGE,
        modulus_range=secure.MOD_RANGE,
        timeout=timeout,
    )


def run_protocol(
    grid: Grid,
    server_round: int,
    contents: dict[int, RecordDict],
    wf: SecAggPlusWorkflow,
) -> tuple[np.ndarray | None, list[tuple[int, FitRes]], int]:
    """The four SecAgg+ stages over ``contents`` (node id -> its train message content).

    Returns (the unmasked weighted mean, or None if the protocol halted; (node id, FitRes)
    of each contributor, whose parameters field holds that mean; stages completed)."""
    strat = _Strategy(sorted(contents))
    state_rd = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    ctx = _Context(state_rd, strat, _ClientManager(len(contents)))
    st = WorkflowState()
    done = 0
    for i, step in enumerate(
        (wf.setup_stage, wf.share_keys_stage, wf.collect_masked_vectors_stage, wf.unmask_stage)
    ):
        if i == 2:  # the masked vectors come from fedtune's own train messages
            st.nid_to_fitins = {n: contents[n] for n in st.nid_to_fitins}
        if not step(grid, ctx, st):  # type: ignore[arg-type]  # duck-typed LegacyContext
            log(WARNING, "round %d: SecAgg+ halted after %d of 4 stages", server_round, done)
            return None, [], done
        done += 1
    if not strat.results:
        return None, [], done
    mean = parameters_to_ndarrays(strat.results[0][1].parameters)[0]
    return mean, [(p.node_id, r) for p, r in strat.results], done


def secure_round(
    strategy: Any, grid: Grid, server_round: int, messages: Sequence[Message], timeout: float
) -> tuple[ArrayRecord | None, Any]:
    """Round ``server_round`` under SecAgg+: protocol, then fedtune's server round on the sum."""
    contents = {m.metadata.dst_node_id: m.content for m in messages}
    sampled = len(contents)
    dp = strategy.round.dp
    private = strategy.private
    c = private.clip_range(dp)
    total = None
    if sampled >= 2:
        wf = workflow(threshold=private.secagg_threshold, clip_range=c,
                      max_weight=private.max_weight(dp), timeout=timeout)  # fmt: skip
        mean, got, _ = run_protocol(grid, server_round, contents, wf)
        if mean is not None:
            contributors = []
            for node, fr in got:
                slot = strategy.issued[node][0]
                loss = fr.metrics.get("train-loss", math.nan)
                contributors.append((slot, float(fr.num_examples), float(loss)))  # type: ignore[arg-type]
            vec = torch.from_numpy(np.asarray(mean, dtype=np.float64)).float()
            vec[-1] = vec[-1] * (4.0 / c)  # the clip bit travels as b * c / 4
            weight = float(sum(w for _, w, _ in contributors))
            total = rnd_.SecureSum(vec, weight, contributors, sampled)
    else:
        log(
            WARNING,
            "round %d: SecAgg+ needs at least 2 sampled nodes, got %d",
            server_round,
            sampled,
        )
    stats = strategy.new_stats(server_round)
    if total is None:
        res = rnd_.RoundResult(server_round, dict(strategy.current), skipped=True)
        res.notes.append("SecAgg+ round failed (too few survivors): nothing applied")
    else:
        log(
            INFO,
            "round %d: SecAgg+ sum of %d of %d nodes",
            server_round,
            len(total.contributors),
            sampled,
        )
        res = strategy.round(server_round, strategy.current, [], secure=total, sampled=sampled)
    return strategy.finish_round(server_round, res, stats)
