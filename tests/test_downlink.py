"""Compact downlink: clients rebuild the global adapter from payload chains, bit for bit.

Mock grid and replies as in tests/test_strategy.py, with the real client-side code
(:func:`fedtune.fl.downlink.receive`) standing in for each node.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from unittest.mock import Mock

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune import merging, parts, pipeline, rng
from fedtune.config import ConfigError, parse
from fedtune.downlink import (
    Chain,
    DownlinkError,
    History,
    Step,
    Update,
    pack_chain,
    state_digest,
    unpack_chain,
)
from fedtune.fl import downlink as fl_downlink
from fedtune.fl.records import key_from_config, payload_to_record, record_to_state, state_to_record
from tests.helpers import identity_replies, make_strategy

NODES = [11, 22, 33, 44]  # slots 0..3 (partition id = rank)
SPEC_KEY = 0xD0


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps new Messages with the run's identity; outside a run we set a fake one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _spec() -> dict[str, torch.Tensor]:
    """A keyed, non-zero initial adapter of 3 tensors (4608 values)."""
    shapes = {"l0.A": (16, 128), "l0.B": (128, 16), "head": (4, 128)}
    return {
        n: rng.normal(SPEC_KEY, i, s[0] * s[1]).view(s) * 0.1
        for i, (n, s) in enumerate(shapes.items())
    }


def _grid(schedule: dict[int, list[int]], state: dict[str, int]):
    """A Grid whose connected nodes follow ``schedule[round]``; identity queries get ranks."""
    g = Mock()
    g.get_node_ids.side_effect = lambda: list(schedule[state["round"]])

    g.send_and_receive.side_effect = lambda msgs, timeout: identity_replies(msgs, NODES)
    return g


def _reply(node: int, payload: bytes | None, n: int = 10, error: str = ""):
    m = Mock()
    m.metadata.src_node_id = node
    m.has_error.return_value = bool(error)
    m.error.reason = error
    content: dict = {"metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})}
    if payload is not None:
        content["arrays"] = payload_to_record(payload)
    m.content = RecordDict(content)
    return m


def _cfg(**kw):
    base = {"codec": "srht", "codec-k": 96, "downlink": "auto", "min-train-nodes": 1}
    base.update(kw)
    return parse(base)


def _strategy(cfg, client_initial=False, clip=None):
    return make_strategy(
        codec=parts.codec(cfg),
        merger=merging.get(cfg.merger, **dict(cfg.merger_options)),
        server_opt=merging.get_server_opt(cfg.server_opt, **dict(cfg.server_opt_options)),
        spec=_spec(),
        run_seed=7,
        min_valid=1,
        clip=clip,
        downlink=cfg.downlink,
        client_initial=client_initial,
        fraction_train=1.0,
        min_train_nodes=1,
        min_available_nodes=1,
        node_wait=0.01,
    )


def _delta(key: int, like: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    return {
        n: rng.normal(key, 100 + i, t.numel()).view_as(t) * scale
        for i, (n, t) in enumerate(like.items())
    }


def _run(cfg, schedule, *, client_initial=False, clip=None, tamper=None, scale=0.01):
    """Rounds 1..len(schedule) with real client-side rebuilds; returns a log of what happened.

    ``tamper(round, node, context)`` may corrupt a client's stored state before it receives.
    """
    s = _strategy(cfg, client_initial, clip)
    codec = parts.codec(cfg)
    contexts = {n: SimpleNamespace(state=RecordDict()) for n in NODES}
    arrays = state_to_record(_spec())
    tick = {"round": 1}
    grid = _grid(schedule, tick)
    log: dict = {"kind": {}, "rounds": {}, "errors": {}, "states": []}
    for rnd in sorted(schedule):
        tick["round"] = rnd
        msgs = list(s.configure_train(rnd, arrays, ConfigRecord({}), grid))
        server_state = record_to_state(arrays)
        replies = []
        for m in msgs:
            node = m.metadata.dst_node_id
            kind = "chain" if fl_downlink.DOWNLINK in m.content.array_records else "dense"
            log["kind"][(rnd, node)] = kind
            if kind == "chain":
                blob = m.content.array_records[fl_downlink.DOWNLINK]["payload"].numpy().tobytes()
                log["rounds"][(rnd, node)] = [st.round for st in unpack_chain(blob).steps]
            if tamper is not None:
                tamper(rnd, node, contexts[node])
            try:
                got, config = fl_downlink.receive(
                    m,
                    contexts[node],
                    cfg,
                    initial=lambda: {k: v.clone() for k, v in _spec().items()},
                )
            except DownlinkError as e:
                log["errors"][(rnd, node)] = str(e)
                replies.append(_reply(node, None, error=str(e)))
                continue
            assert list(got) == list(server_state)
            for k in got:  # bit for bit, not approximately
                assert torch.equal(got[k], server_state[k]), (rnd, node, k)
            key, slot = key_from_config(config), int(config["slot"])
            payload = codec.encode(_delta(key, got, scale * (1 + slot)), key, round=rnd, slot=slot)
            replies.append(_reply(node, payload, n=10 + 5 * slot))
        new, _ = s.aggregate_train(rnd, replies)
        if new is not None:
            arrays = new
        log["states"].append(record_to_state(arrays))
    log["history"] = s.history
    log["strategy"] = s
    return log


# rounds 1..5: node 33 misses rounds 2-3 (chain of 2 rounds in round 4); 44 first joins in 5
SCHEDULE = {
    1: [11, 22, 33],
    2: [11, 22],
    3: [11, 22],
    4: [11, 22, 33],
    5: [11, 22, 33, 44],
}


@pytest.mark.parametrize("mode", ["payloads", "auto"])
def test_clients_rebuild_the_global_state_bit_for_bit(mode):
    log = _run(_cfg(downlink=mode), SCHEDULE)
    assert not log["errors"]
    kind = log["kind"]
    assert kind[(1, 11)] == "dense"  # holds nothing yet (client_initial off)
    assert kind[(2, 11)] == kind[(3, 22)] == "chain"  # one round behind
    assert log["rounds"][(2, 11)] == [1]
    assert log["rounds"][(4, 33)] == [1, 2, 3]  # trained in round 1, skipped rounds 2 and 3
    assert log["rounds"][(5, 33)] == [4]
    assert kind[(5, 44)] == "dense"  # never sampled before


def test_auto_and_dense_downlinks_give_the_same_model_and_auto_sends_fewer_bytes():
    dense = _run(_cfg(downlink="dense"), SCHEDULE)
    auto = _run(_cfg(downlink="auto"), SCHEDULE)
    for a, b in zip(dense["states"], auto["states"], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    d = sum(h.bytes_down for h in dense["history"])
    c = sum(h.bytes_down for h in auto["history"])
    assert (
        sum(h.chains for h in auto["history"]) > 0 and sum(h.chains for h in dense["history"]) == 0
    )
    assert c < 0.6 * d, (c, d)  # srht with k=96 of 4608 values: payloads are ~5% of dense
    # per-slot totals add up to the round totals
    totals = auto["strategy"].byte_totals()
    assert sum(down for _, down in totals.values()) == c
    assert sum(up for up, _ in totals.values()) == sum(h.bytes_up for h in auto["history"])


def test_auto_sends_dense_when_the_chain_is_bigger():
    # dense codec: every payload is as big as the state, 2+ clients per round -> dense wins
    log = _run(_cfg(codec="dense", **{"codec-k": ""}, downlink="auto"), SCHEDULE)
    assert set(log["kind"].values()) == {"dense"}
    # ... and payloads mode sends the chain anyway, at a higher cost
    pay = _run(_cfg(codec="dense", **{"codec-k": ""}, downlink="payloads"), SCHEDULE)
    assert pay["kind"][(4, 33)] == "chain" and not pay["errors"]
    assert sum(h.bytes_down for h in pay["history"]) > sum(h.bytes_down for h in log["history"])


def test_never_sampled_client_rebuilds_from_the_keyed_initial_adapter():
    log = _run(_cfg(downlink="payloads"), SCHEDULE, client_initial=True)
    assert not log["errors"]
    assert log["kind"][(1, 11)] == "chain"  # empty chain from version 0 + digest
    assert log["rounds"][(1, 11)] == []
    assert log["rounds"][(5, 44)] == [1, 2, 3, 4]  # replayed from the initial adapter


def test_task_arithmetic_sgd_and_norm_clip_stay_exact():
    cfg = _cfg(
        merger="task-arithmetic",
        **{"merger-scale": 0.7, "server-opt": "sgd", "server-opt-lr": 0.5},
        downlink="payloads",
    )
    clip = merging.NormClip(0.05)  # the deltas have norms ~0.7+: every one is clipped
    log = _run(cfg, SCHEDULE, clip=clip)
    assert not log["errors"] and log["kind"][(4, 33)] == "chain"
    median = _run(cfg, SCHEDULE, clip=merging.NormClip(0.5, relative=True))
    assert not median["errors"]


def test_digest_mismatch_is_a_clear_error_and_the_slot_gets_dense_next():
    def tamper(rnd, node, ctx):
        if rnd == 3 and node == 22:  # flip one stored value of node 22
            st = record_to_state(ctx.state.array_records["downlink-state"])
            st["head"][0, 0] += 1.0
            ctx.state["downlink-state"] = state_to_record(st)

    log = _run(_cfg(downlink="payloads"), SCHEDULE, tamper=tamper)
    err = log["errors"][(3, 22)]
    assert "digest" in err and "server" in err
    assert "22" in log["history"][2].dropped  # the server dropped the error reply
    assert log["kind"][(4, 22)] == "dense"  # and sent the dense state next time
    assert len(log["errors"]) == 1


def test_client_holding_another_version_says_so():
    st = _spec()
    ctx = SimpleNamespace(state=RecordDict())
    ctx.state["downlink-state"] = state_to_record(st)
    ctx.state["downlink-meta"] = ConfigRecord({"version": 1})
    chain = Chain(2, 3, state_digest(st), (Step(3, 5),))
    msg = Mock()
    msg.content = RecordDict(
        {
            fl_downlink.DOWNLINK: fl_downlink.chain_to_record(chain),
            "config": ConfigRecord({"server-round": 4}),
        }
    )
    with pytest.raises(DownlinkError, match=r"version 2.*holds version 1"):
        fl_downlink.receive(msg, ctx, _cfg(), initial=_spec)


def test_chain_wire_roundtrip_and_corruption():
    steps = (
        Step(2, 123, (Update(0, 2**64 - 1, 10.0, 1.0, b"abc"), Update(3, 5, 2.5, 0.25, b""))),
        Step(3, 9),
    )
    chain = Chain(1, 3, bytes(range(32)), steps)
    blob = pack_chain(chain)
    assert unpack_chain(blob) == chain
    with pytest.raises(DownlinkError, match="CRC"):
        unpack_chain(blob[:10] + bytes([blob[10] ^ 1]) + blob[11:])
    with pytest.raises(DownlinkError, match="shorter"):
        unpack_chain(blob[:8])


def test_history_prunes_rounds_no_cheaper_chain_can_use():
    h = History("auto")
    for r in range(1, 6):
        h.record(Step(r, r, (Update(0, 1, 1.0, 1.0, b"x" * 100),)))
    h.prune(250)  # rounds 5, 4, 3 fit in 300 > 250 bytes; 1 and 2 can never be cheaper
    assert sorted(h.steps) == [3, 4, 5]
    h.delivered(0, 1)
    assert h.chain(0, 5) is None  # needs round 2: dense
    h.delivered(0, 2)
    assert h.chain(0, 5) is not None


@pytest.mark.parametrize(
    ("extra", "key", "why"),
    [
        ({"merger": "ties"}, "merger", "linear"),
        ({"server-opt": "fedadam"}, "server-opt", "optimizer state"),
        ({"codec": "gaussian"}, "codec", "BLAS"),
        ({"factor-mode": "exact"}, "factor-mode", "residual"),
        ({"downlink": "sometimes"}, "downlink", "allowed"),
    ],
)
def test_config_rejects_what_a_client_cannot_rebuild(extra, key, why):
    with pytest.raises(ConfigError) as e:
        parts.load_config({"downlink": "payloads", **extra})
    msg = str(e.value)
    assert f"'{key}'" in msg and why in msg and "\n" not in msg


@pytest.mark.parametrize(
    "extra",
    [
        {"downlink": "auto", "merger": "task-arithmetic", "server-opt": "sgd"},
        {"downlink": "payloads", "codec": "countsketch", "clip-norm": 1.0},
        {"downlink": "dense", "merger": "ties", "server-opt": "fedadam", "codec": "gaussian"},
    ],
)
def test_config_accepts_linear_stateless_setups_and_dense_anything(extra):
    """Accepted because of what the methods declare (not a list of names): a compact downlink
    gets a linear merger, a stateless optimizer and a replayable codec; dense takes anything."""
    cfg = parts.load_config(extra)
    assert cfg.downlink == extra["downlink"] and cfg.merger == extra.get("merger", "fedavg")
    if cfg.downlink != "dense":
        assert parts.merger(cfg).linear is True
        assert parts.server_opt(cfg).stateless is True
        assert parts.codec(cfg).replayable is True
    else:
        assert not getattr(parts.merger(cfg), "linear", False)
        assert not parts.server_opt(cfg).stateless


def test_dense_downlink_messages_are_unchanged():
    s = _strategy(_cfg(downlink="dense"))
    grid = _grid({1: NODES}, {"round": 1})
    msgs = list(s.configure_train(1, state_to_record(_spec()), ConfigRecord({}), grid))
    assert all(set(m.content.array_records) == {"arrays"} for m in msgs)
    assert isinstance(msgs[0].content.array_records["arrays"], ArrayRecord)
    assert s.history == [] and s.byte_totals()[0][1] > 0


@pytest.mark.slow
def test_three_round_flwr_run_with_srht_and_auto_downlink(tiny_run_config, tmp_path, capsys):
    """A real `flwr run`: clients rebuild the adapter from chains (round 1: from the keyed
    initial adapter they build themselves; round 3: from the state kept in ``context.state``)
    and every rebuild passes its digest check."""
    from fedtune.launch import main as launch

    cfg = {
        **tiny_run_config,
        "codec": "srht",
        "codec-k": 256,
        "codec-coef-bits": 8,
        "downlink": "auto",
        "num-rounds": 3,
    }
    kv = " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())
    rc = launch(["-c", kv, "--flwr-home", str(tmp_path / "flwr-home")])
    out = capsys.readouterr().out
    assert rc == 0, out
    (run,) = list((tmp_path / "runs").iterdir())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["valid-replies"] == 3 and r["dropped-replies"] == 0 for r in rows[1:])
    parsed = parse(cfg)
    d = sum(
        t.numel() for t in pipeline.workbench(parsed, pipeline.federation(parsed)).initial.values()
    )
    dense_round = 3 * 4 * d  # what the dense downlink sends per round, at least
    assert all(r["bytes-down"] < 0.5 * dense_round for r in rows[1:]), (rows, dense_round)
    totals = json.loads((run / "bytes-per-client.json").read_text())
    assert len(totals) == 3 and sum(t["bytes-down"] for t in totals.values()) == sum(
        r["bytes-down"] for r in rows[1:]
    )
