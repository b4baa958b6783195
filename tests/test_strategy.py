"""Mock-reply tests of the strategy: hand-computed aggregation, key issuance, rejection."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune import codecs, merging
from fedtune.fl.records import key_from_config, payload_to_record, record_to_state, state_to_record
from tests.helpers import make_strategy

NODES = [303, 101, 202]


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps new Messages with the run's identity; outside a run we set a fake one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _identity_reply(node, pid):
    m = Mock()
    m.metadata.src_node_id = node
    m.has_error.return_value = False
    m.content = RecordDict({"identity": MetricRecord({"partition-id": pid})})
    return m


def _grid(nodes=NODES, partition=None):
    """A Grid whose nodes answer the identity query with partition ids (default: rank)."""
    partition = partition or {n: i for i, n in enumerate(sorted(nodes))}
    g = Mock()
    g.get_node_ids.return_value = list(nodes)
    g.send_and_receive.side_effect = lambda msgs, timeout: [
        _identity_reply(m.metadata.dst_node_id, partition[m.metadata.dst_node_id]) for m in msgs
    ]
    return g


def _strategy(codec="dense", merger="fedavg", server_opt="none", **kw):
    spec = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    return make_strategy(
        codec=codecs.get(codec),
        merger=merging.get(merger),
        server_opt=merging.get_server_opt(server_opt),
        spec=spec,
        run_seed=42,
        min_valid=kw.pop("min_valid", 1),
        fraction_train=1.0,
        min_train_nodes=2,
        min_available_nodes=2,
        **kw,
    ), spec


def _reply(node, payload: bytes | None = None, n=10, loss=0.5, error=False, extra_metrics=None):
    m = Mock()
    m.metadata.src_node_id = node
    m.has_error.return_value = error
    if error:
        m.error.reason = "boom"
    metrics = {"num-examples": n, "train-loss": loss} if n is not None else {"train-loss": loss}
    metrics.update(extra_metrics or {})
    content = {"metrics": MetricRecord(metrics)}
    if payload is not None:
        content["arrays"] = payload_to_record(payload)
    m.content = RecordDict(content)
    return m


def _configure(strategy, spec, rnd=1):
    msgs = list(strategy.configure_train(rnd, state_to_record(spec), ConfigRecord({}), _grid()))
    return {m.metadata.dst_node_id: m for m in msgs}


def _delta(val):
    return {"a": torch.full((2, 3), float(val)), "b": torch.arange(4, dtype=torch.float32) * val}


def test_keys_are_per_client_deterministic_and_issued_in_config():
    s, spec = _strategy()
    msgs = _configure(s, spec)
    assert sorted(msgs) == sorted(NODES)
    slots = {n: int(m.content["config"]["slot"]) for n, m in msgs.items()}
    assert slots == {101: 0, 202: 1, 303: 2}  # slot = rank of node id
    keys = {n: key_from_config(m.content["config"]) for n, m in msgs.items()}
    assert len(set(keys.values())) == 3
    assert all(keys[n] == s.client_key(1, slots[n]) for n in NODES)
    s2, _ = _strategy()
    assert {
        n: key_from_config(m.content["config"]) for n, m in _configure(s2, spec).items()
    } == keys
    assert key_from_config(_configure(s2, spec, rnd=2)[101].content["config"]) != keys[101]


def test_slots_follow_reported_partition_ids_and_duplicates_fall_back():
    s, spec = _strategy()
    g = _grid(partition={101: 7, 202: 3, 303: 3})
    msgs = list(s.configure_train(1, state_to_record(spec), ConfigRecord({}), g))
    slots = {m.metadata.dst_node_id: int(m.content["config"]["slot"]) for m in msgs}
    assert slots[101] == 7
    assert slots[202] >= 1 << 20 and slots[303] >= 1 << 20 and slots[202] != slots[303]
    # identities are asked once, not every round
    list(s.configure_train(2, state_to_record(spec), ConfigRecord({}), g))
    assert g.send_and_receive.call_count == 1


def test_too_few_nodes_gives_an_empty_round_instead_of_hanging():
    s, spec = _strategy()
    s.node_wait = 0.1
    assert (
        list(s.configure_train(1, state_to_record(spec), ConfigRecord({}), _grid(nodes=[5]))) == []
    )


def test_fraction_sampling_is_keyed_and_reproducible():
    nodes = list(range(100, 110))
    picks = []
    for _ in range(2):
        s, spec = _strategy()
        s.fraction_train = 0.3
        msgs = list(
            s.configure_train(4, state_to_record(spec), ConfigRecord({}), _grid(nodes=nodes))
        )
        picks.append(sorted(m.metadata.dst_node_id for m in msgs))
    assert len(picks[0]) == 3 and picks[0] == picks[1]


def test_fedavg_aggregation_hand_computed():
    s, spec = _strategy()
    _configure(s, spec)
    codec = codecs.get("dense")
    replies = [
        _reply(
            n, codec.encode(_delta(v), s.issued[n][1], round=1, slot=s.issued[n][0]), n=w, loss=lo
        )
        for n, v, w, lo in [(101, 1.0, 10, 1.0), (202, 4.0, 30, 0.2), (303, -2.0, 60, 0.4)]
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    # weighted mean of (1, 4, -2) with weights (10, 30, 60) = (10 + 120 - 120) / 100 = 0.1
    got = record_to_state(arrays)
    np.testing.assert_allclose(got["a"].numpy(), np.full((2, 3), 0.1), rtol=1e-6)
    np.testing.assert_allclose(got["b"].numpy(), np.arange(4) * 0.1, rtol=1e-6, atol=1e-7)
    assert metrics["valid-replies"] == 3 and metrics["num-examples"] == 100
    assert metrics["train-loss"] == pytest.approx((10 * 1.0 + 30 * 0.2 + 60 * 0.4) / 100)
    assert metrics["bytes-up"] > 0 and metrics["bytes-down"] > 0


def test_invalid_replies_are_dropped_with_reasons_and_the_rest_merged():
    s, spec = _strategy()
    _configure(s, spec)
    codec = codecs.get("dense")
    good = codec.encode(_delta(2.0), s.issued[101][1], round=1, slot=s.issued[101][0])
    wrong_key = codec.encode(_delta(9.0), s.issued[101][1], round=1, slot=s.issued[202][0])
    replies = [
        _reply(101, good, n=5),
        _reply(202, wrong_key, n=5),  # another client's key
        _reply(303, None, error=True),  # client raised
        _reply(999, good, n=5),  # not sampled this round
    ]
    arrays, _metrics = s.aggregate_train(1, replies)
    np.testing.assert_allclose(record_to_state(arrays)["a"].numpy(), 2.0)
    stats = s.history[-1]
    assert stats.valid == 1 and set(stats.dropped) == {"202", "303", "999"}
    assert "boom" in stats.dropped["303"]


@pytest.mark.parametrize(
    "make",
    [
        lambda s, good: _reply(101, good, n=None),  # missing num-examples
        lambda s, good: _reply(101, good, n=-3),  # negative num-examples
        lambda s, good: _reply(101, good[:-5], n=3),  # truncated payload
        lambda s, good: _reply(101, bytes([good[0] ^ 0xFF]) + good[1:], n=3),  # corrupt
        lambda s, good: _reply(101, None, n=3),  # no arrays at all
    ],
)
def test_bad_replies_leave_the_global_model_unchanged(make):
    s, spec = _strategy(min_valid=1)
    _configure(s, spec)
    good = codecs.get("dense").encode(_delta(2.0), s.issued[101][1], round=1, slot=0)
    arrays, _ = s.aggregate_train(1, [make(s, good)])
    assert arrays is None  # too few valid replies -> FedAvg.start keeps the previous arrays
    assert s.history[-1].skipped and "101" in s.history[-1].dropped


def test_norm_bound_rejects_absurd_updates():
    s, spec = _strategy(max_update_norm=10.0)
    _configure(s, spec)
    c = codecs.get("dense")
    big = c.encode(_delta(1e6), s.issued[101][1], round=1, slot=0)
    ok = c.encode(_delta(0.5), s.issued[202][1], round=1, slot=1)
    arrays, _ = s.aggregate_train(1, [_reply(101, big), _reply(202, ok)])
    assert "exceeds the bound" in s.history[-1].dropped["101"]
    np.testing.assert_allclose(record_to_state(arrays)["a"].numpy(), 0.5)


def test_round_mismatch_is_rejected():
    s, spec = _strategy()
    _configure(s, spec, rnd=3)
    stale = codecs.get("dense").encode(_delta(1.0), s.issued[101][1], round=2, slot=0)
    arrays, _ = s.aggregate_train(3, [_reply(101, stale)])
    assert arrays is None and "round" in s.history[-1].dropped["101"].lower()


def test_arrayrecord_roundtrip_keeps_names():
    st = {"x.weight": torch.randn(3, 2, generator=torch.Generator().manual_seed(0))}
    rec = state_to_record(st)
    assert isinstance(rec, ArrayRecord) and list(rec.keys()) == ["x.weight"]
    assert torch.equal(record_to_state(rec)["x.weight"], st["x.weight"])


def _grid5():
    return [101, 202, 303, 404, 505]


def test_direction_filter_drops_updates_against_the_consensus_and_logs_why():
    nodes = _grid5()
    s, spec = _strategy(direction_filter=merging.CosineFilter(0.0))
    msgs = list(s.configure_train(1, state_to_record(spec), ConfigRecord({}), _grid(nodes=nodes)))
    assert len(msgs) == 5
    c = codecs.get("dense")
    values = {101: 1.0, 202: 1.5, 303: 2.0, 404: -100.0, 505: 0.5}  # 404 sign-flips, boosted
    replies = [
        _reply(n, c.encode(_delta(v), s.issued[n][1], round=1, slot=s.issued[n][0]), n=10)
        for n, v in values.items()
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    np.testing.assert_allclose(record_to_state(arrays)["a"].numpy(), 1.25, rtol=1e-6)
    stats = s.history[-1]
    assert stats.valid == 4 and set(stats.dropped) == {"404"}
    assert "direction filter: cosine -1.000" in stats.dropped["404"]
    assert metrics["dropped-replies"] == 1


def test_clip_reject_drops_oversized_updates_before_the_direction_filter_and_logs_why():
    nodes = _grid5()
    s, spec = _strategy(
        clip=merging.NormClip(1.0, relative=True, reject=10.0),
        direction_filter=merging.CosineFilter(0.0),
    )
    msgs = list(s.configure_train(1, state_to_record(spec), ConfigRecord({}), _grid(nodes=nodes)))
    assert len(msgs) == 5
    c = codecs.get("dense")
    values = {101: 1.0, 202: 1.0, 303: 1.0, 404: -100.0, 505: 1.0}  # 404 flips, 100x
    replies = [
        _reply(n, c.encode(_delta(v), s.issued[n][1], round=1, slot=s.issued[n][0]), n=10)
        for n, v in values.items()
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    # dropped, not clipped: clipped to the median norm it would pull the mean to (4 - 1) / 5
    assert torch.equal(record_to_state(arrays)["a"], torch.full((2, 3), 1.0))
    stats = s.history[-1]
    assert stats.valid == 4 and set(stats.dropped) == {"404"}
    assert "is 100x the round's clip bound" in stats.dropped["404"]
    assert "clip-reject 10" in stats.dropped["404"]
    assert metrics["dropped-replies"] == 1


def test_identify_sampled_asks_only_the_sampled_nodes():
    """identify-nodes='sampled' (thousands of nodes): round 1 sends one identity query per
    *sampled* node, not per connected node; keys stay per slot (the reported partition id)."""
    nodes = list(range(1000, 1050))
    partition = {n: 49 - i for i, n in enumerate(nodes)}  # partition ids unrelated to node ids
    s, spec = _strategy(identify_nodes="sampled")
    s.fraction_train = 0.1
    g = _grid(nodes=nodes, partition=partition)
    msgs = list(s.configure_train(1, state_to_record(spec), ConfigRecord({}), g))
    assert len(msgs) == 5
    (queries,), _ = g.send_and_receive.call_args
    assert sorted(m.metadata.dst_node_id for m in queries) == sorted(
        m.metadata.dst_node_id for m in msgs
    )  # asked exactly the sampled five
    for m in msgs:
        slot = int(m.content["config"]["slot"])
        assert slot == partition[m.metadata.dst_node_id]
        assert key_from_config(m.content["config"]) == s.client_key(1, slot)
    # 'all' (and 'auto' up to 256 nodes) asks every node once
    s_all, _ = _strategy(identify_nodes="all")
    s_all.fraction_train = 0.1
    g_all = _grid(nodes=nodes, partition=partition)
    list(s_all.configure_train(1, state_to_record(spec), ConfigRecord({}), g_all))
    (queries_all,), _ = g_all.send_and_receive.call_args
    assert len(queries_all) == 50


@pytest.mark.parametrize(("n", "asked"), [(256, 256), (300, 15)])
def test_identify_auto_asks_all_nodes_up_to_256(n, asked):
    nodes = list(range(5000, 5000 + n))
    s, spec = _strategy()  # identify_nodes='auto', the default
    s.fraction_train = 0.05
    g = _grid(nodes=nodes)
    msgs = list(s.configure_train(1, state_to_record(spec), ConfigRecord({}), g))
    (queries,), _ = g.send_and_receive.call_args
    assert len(queries) == asked and len(msgs) == int(n * 0.05)


def test_identify_nodes_must_be_known():
    with pytest.raises(ValueError, match="identify_nodes"):
        _strategy(identify_nodes="some")
