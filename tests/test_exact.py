"""factor-mode='exact' (FedEx-LoRA, Singhal et al. 2024): the residual makes aggregation exact.

Tiny in-code models whose output is linear in every adapted weight (parallel Linears
concatenated), so "the global model's output equals the weighted average of the client
models' outputs" is a property of the weights, checkable to 1e-5. Two rounds through the real
strategy (dense codec, FedAvg): the second round starts from a non-zero residual.
"""

from __future__ import annotations

from unittest.mock import Mock

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from peft import LoraConfig, get_peft_model
from torch import nn

from fedtune import adapters, checkpoint, codecs, merging, parts, rng
from fedtune.adapters import exact
from fedtune.adapters.lora import init_from_key
from fedtune.adapters.mos import MoS
from fedtune.config import ConfigError, parse
from fedtune.fl.records import (
    RESIDUAL,
    payload_to_record,
    record_to_state,
    state_to_record,
    train_residual,
)
from fedtune.fl.strategy import FedTuneStrategy
from tests.helpers import held_out_metrics, identity_replies, make_strategy

KEY = rng.derive_key(2024, 6)  # issue #6
NODES = [101, 202, 303]
WEIGHTS = {101: 10, 202: 30, 303: 60}  # num-examples -> normalised 0.1, 0.3, 0.6
D_IN, D_OUT = 8, 12


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps new Messages with the run's identity; outside a run we set a fake one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D_IN, D_OUT)


class Parallel(nn.Module):
    """Two ``proj`` layers side by side: the output is linear in each weight."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b.proj(x) for b in self.layers], dim=-1)


def _base() -> Parallel:
    m = Parallel()
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(rng.normal(KEY, 100 + i, p.numel()).view_as(p) * 0.5)
    return m


def _model(kind: str) -> nn.Module:
    if kind == "lora":
        peft = get_peft_model(_base(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
        init_from_key(peft, KEY)
        return peft
    return MoS(r=2, e=1, p=0, l=2, alpha=4.0, target_modules=("proj",)).attach(_base(), KEY)


def _x() -> torch.Tensor:
    return rng.normal(KEY, 7, 5 * D_IN).view(5, D_IN)


def _output(model: nn.Module, state: dict, residual: dict | None) -> torch.Tensor:
    adapters.load_trainable_state(model, state)
    exact.set_residual(model, residual)
    with torch.no_grad():
        return model(_x())


def _grid() -> Mock:
    g = Mock()
    g.get_node_ids.return_value = list(NODES)
    g.send_and_receive.side_effect = lambda msgs, timeout: identity_replies(msgs, NODES)
    return g


def _reply(node: int, payload: bytes) -> Mock:
    m = Mock()
    m.metadata.src_node_id = node
    m.has_error.return_value = False
    m.content = RecordDict(
        {
            "arrays": payload_to_record(payload),
            "metrics": MetricRecord({"num-examples": WEIGHTS[node], "train-loss": 0.1}),
        }
    )
    return m


def _delta(spec: dict, rnd: int, node: int) -> dict:
    """A hand-built factor update: keyed N(0, 0.3²) on every trainable tensor."""
    return {
        k: rng.normal(rng.derive_key(KEY, rnd, node), i, v.numel()).view_as(v) * 0.3
        for i, (k, v) in enumerate(spec.items())
    }


def _strategy(spec: dict, ex: exact.ExactResidual | None) -> FedTuneStrategy:
    return make_strategy(
        codec=codecs.get("dense"),
        merger=merging.get("fedavg"),
        server_opt=merging.get_server_opt("none"),
        spec=spec,
        run_seed=42,
        exact=ex,
        fraction_train=1.0,
        min_train_nodes=2,
        min_available_nodes=2,
    )


def _run_rounds(kind: str, mode: str, rounds: int = 2):
    """Drive the real strategy; yield per round what the exactness claims need."""
    model = _model(kind)
    state = adapters.trainable_state(model)
    ex = exact.ExactResidual(exact.exact_layers(model)) if mode == "exact" else None
    s = _strategy(state, ex)
    grid = _grid()
    for rnd in range(1, rounds + 1):
        msgs = {
            m.metadata.dst_node_id: m
            for m in s.configure_train(rnd, state_to_record(state), ConfigRecord({}), grid)
        }
        # what the clients trained on: the global adapter and the residual of the message
        sent = {n: train_residual(m) for n, m in msgs.items()}  # what the ClientApp reads
        residual_in = sent[101]
        assert all((r is None) == (residual_in is None) for r in sent.values())
        assert all(
            r is None or all(torch.equal(r[k], residual_in[k]) for k in r) for r in sent.values()
        )
        has = rnd > 1 and mode == "exact"  # round 1: R = 0 travels as no record at all
        assert all((RESIDUAL in m.content.array_records) == has for m in msgs.values())
        deltas = {n: _delta(state, rnd, n) for n in NODES}
        replies = [
            _reply(
                n,
                codecs.get("dense").encode(
                    deltas[n], s.issued[n][1], round=rnd, slot=s.issued[n][0]
                ),
            )
            for n in NODES
        ]
        arrays, _ = s.aggregate_train(rnd, replies)
        assert arrays is not None
        new_state = record_to_state(arrays)
        clients = {n: {k: state[k] + deltas[n][k] for k in state} for n in NODES}
        yield model, state, residual_in, clients, new_state, (ex.residual if ex else None), s
        state = new_state


@pytest.mark.parametrize("kind", ["lora", "mos"])
def test_exact_global_model_is_the_weighted_average_of_the_client_models(kind):
    total = sum(WEIGHTS.values())
    w = {n: WEIGHTS[n] / total for n in NODES}
    base = {f"layers.{i}.proj.weight": _base().layers[i].proj.weight.detach() for i in range(2)}
    for rnd, (model, _, r_in, clients, new_state, r_out, s) in enumerate(
        _run_rounds(kind, "exact"), start=1
    ):
        assert (r_in is None) == (rnd == 1)  # round 1 has no residual yet, round 2 has one
        client_out = {n: _output(model, clients[n], r_in) for n in NODES}
        avg = sum(w[n] * client_out[n] for n in NODES)
        glob = _output(model, new_state, r_out)
        torch.testing.assert_close(glob, avg, atol=1e-5, rtol=1e-5)
        # and in weight space: W_0 + R + s B̄Ā = Σ_k w_k (W_0 + R_in + s B_k A_k)
        layers = exact.exact_layers(model)
        got = exact.effective_weights(layers, base, r_out or {}, new_state)
        for x in layers:
            want = sum(
                w[n] * (base[x.name] + (r_in or {}).get(x.name, 0) + x.delta(clients[n]))
                for n in NODES
            )
            torch.testing.assert_close(got[x.name], want, atol=1e-5, rtol=1e-5)
            # the model really carries these weights (set_residual changed the base layer)
            frozen = exact._frozen_weight(model, x)
            torch.testing.assert_close(frozen, base[x.name] + r_out[x.name], atol=1e-6, rtol=0)
        if rnd == 2:  # the residual travels dense: d_out·d_in fp32 per layer and message
            assert ex_floats(s) == 2 * D_OUT * D_IN
            assert s.history[-1].bytes_down >= 3 * 4 * ex_floats(s)


def ex_floats(s: FedTuneStrategy) -> int:
    assert s.round.exact is not None
    return int(s.round.exact.downlink_floats())


@pytest.mark.parametrize("kind", ["lora", "mos"])
def test_factors_mode_has_a_gap_on_the_same_updates(kind):
    """The control: without the residual, averaging factors is NOT averaging the models."""
    total = sum(WEIGHTS.values())
    gaps = []
    for model, _, _, clients, new_state, _, _ in _run_rounds(kind, "factors"):
        avg = sum(WEIGHTS[n] / total * _output_plain(model, clients[n]) for n in NODES)
        gaps.append(float((_output_plain(model, new_state) - avg).abs().max()))
    assert min(gaps) > 1e-2, gaps


def _output_plain(model: nn.Module, state: dict) -> torch.Tensor:
    adapters.load_trainable_state(model, state)
    with torch.no_grad():
        return model(_x())


def test_residual_increment_matches_the_definition():
    model = _model("lora")
    layers = exact.exact_layers(model)
    spec = adapters.trainable_state(model)
    states = [{k: spec[k] + v for k, v in _delta(spec, 9, n).items()} for n in NODES]
    ws = [1.0, 3.0, 6.0]
    mean = {k: sum(w / 10 * st[k] for w, st in zip(ws, states, strict=True)) for k in spec}
    inc = exact.residual_increment(layers, states, ws, mean)
    for x in layers:
        want = sum(w / 10 * x.delta(st) for w, st in zip(ws, states, strict=True)) - x.delta(mean)
        torch.testing.assert_close(inc[x.name], want, atol=1e-6, rtol=1e-5)
        assert inc[x.name].abs().max() > 1e-3  # product of means ≠ mean of products
    # one client: nothing to fold
    inc1 = exact.residual_increment(layers, states[:1], [5.0], states[0])
    assert all(float(v.abs().max()) < 1e-6 for v in inc1.values())


def test_clipping_is_applied_once_and_the_result_stays_exact():
    model = _model("lora")
    state = adapters.trainable_state(model)
    ex = exact.ExactResidual(exact.exact_layers(model))
    s = _strategy(state, ex)
    s.round.clip = merging.NormClip(max_norm=0.5)
    list(s.configure_train(1, state_to_record(state), ConfigRecord({}), _grid()))
    deltas = {n: _delta(state, 1, n) for n in NODES}
    replies = [
        _reply(
            n, codecs.get("dense").encode(deltas[n], s.issued[n][1], round=1, slot=s.issued[n][0])
        )
        for n in NODES
    ]
    arrays, _ = s.aggregate_train(1, replies)
    new_state = record_to_state(arrays)
    clients = {n: {k: state[k] + v for k, v in s.round.clip(deltas[n]).items()} for n in NODES}
    total = sum(WEIGHTS.values())
    avg = sum(WEIGHTS[n] / total * _output(model, clients[n], None) for n in NODES)
    torch.testing.assert_close(_output(model, new_state, ex.residual), avg, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"merger": "ties"}, ["'merger'", "'ties'", "exact", "fedavg"]),
        ({"merger": "median"}, ["'merger'", "nonlinear"]),
        ({"merger": "task-arithmetic", "merger-scale": 0.5}, ["'merger'", "merger-scale=1"]),
        ({"server-opt": "fedadam"}, ["'server-opt'", "'none'", "optimizer step"]),
    ],
)
def test_exact_rejects_nonlinear_mergers_and_server_optimizers(extra, words):
    with pytest.raises(ConfigError) as e:
        parts.load_config({"factor-mode": "exact", **extra})
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"merger": "task-arithmetic"},
        {"merger": "task-arithmetic", "merger-scale": 1},
        {"codec": "srht", "codec-k": 64},
        {"codec": "spsa"},
        {"adapter": "mos", "clip-norm": 1.0},
    ],
)
def test_exact_composes_with_linear_mergers_and_every_codec(extra):
    cfg = parse({"factor-mode": "exact", **extra})
    assert cfg.factor_mode == "exact"


# ------------------------------------------------------------------------------ state


def test_checkpoint_keeps_the_residual_and_resume_restores_it(tmp_path):
    model = _model("mos")
    ex = exact.ExactResidual(exact.exact_layers(model))
    ex.residual = {
        x.name: rng.normal(KEY, 50 + i, x.d_out * x.d_in).view(x.d_out, x.d_in)
        for i, x in enumerate(ex.layers)
    }
    ck = checkpoint.Checkpoint(
        round=3,
        seed=1,
        config={},
        adapter=adapters.trainable_state(model),
        server_opt={},
        extra={},
        residual=ex.state_dict(),
    )
    checkpoint.save(tmp_path, ck)
    back = checkpoint.load(tmp_path)
    assert back.residual.keys() == ex.residual.keys()
    resumed = exact.ExactResidual(exact.exact_layers(model))
    resumed.load_state_dict(back.residual)
    for k, v in ex.residual.items():
        assert torch.equal(resumed.residual[k], v)
    # runs in other modes have no residual file and read back none
    checkpoint.save(tmp_path, checkpoint.Checkpoint(1, 1, {}, {"a": torch.zeros(2)}, {}, {}))
    assert checkpoint.load(tmp_path).residual == {}
    with pytest.raises(ValueError, match="does not match"):
        resumed.load_state_dict({"layers.0.proj.weight": torch.zeros(3, 3)})


def test_set_residual_is_absolute_and_exact_layers_refuses_frozen_a():
    model = _model("lora")
    layer = exact.exact_layers(model)[0]
    w0 = exact._frozen_weight(model, layer).detach().clone()
    r = {layer.name: torch.ones(D_OUT, D_IN)}
    exact.set_residual(model, r)
    exact.set_residual(model, r)  # twice: still W_0 + R, not W_0 + 2R
    torch.testing.assert_close(exact._frozen_weight(model, layer), w0 + 1)
    exact.set_residual(model, None)
    assert torch.equal(exact._frozen_weight(model, layer), w0)
    with pytest.raises(ValueError, match="unknown layer"):
        exact.set_residual(model, {"nope.weight": torch.zeros(1)})
    ffa = get_peft_model(_base(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    init_from_key(ffa, KEY, freeze_a=True)
    with pytest.raises(ValueError, match="trainable A and B"):
        exact.exact_layers(ffa)


def test_client_round_trains_on_base_plus_residual(tiny_run_config):
    """The client's frozen weights are W_0 + R during training (and W_0 again without R)."""
    from fedtune import pipeline

    cfg = parse({**tiny_run_config, "factor-mode": "exact", "local-steps": 1})
    fed = pipeline.federation(cfg)
    wb = pipeline.workbench(cfg, fed)
    layers = exact.exact_layers(wb.model)
    w0 = {x.name: exact._frozen_weight(wb.model, x).detach().clone() for x in layers}
    residual = {x.name: torch.full((x.d_out, x.d_in), 0.01 * (i + 1)) for i, x in enumerate(layers)}
    payload, _ = pipeline.client_round(
        cfg, 0, wb.initial, key=KEY, server_round=2, slot=0, residual=residual
    )
    for x in layers:
        torch.testing.assert_close(exact._frozen_weight(wb.model, x), w0[x.name] + residual[x.name])
    pipeline.client_round(cfg, 0, wb.initial, key=KEY, server_round=2, slot=0)
    for x in layers:
        assert torch.equal(exact._frozen_weight(wb.model, x), w0[x.name])
    assert payload


# ------------------------------------------------------------------------------ export


@pytest.mark.parametrize("adapter", ["lora", "mos"])
def test_exported_adapter_plus_residual_reproduces_the_server_metrics(
    adapter, tiny_run_config, tmp_path
):
    """Server-side evaluation (pipeline.evaluate_state with the residual) == a fresh base model
    + base_residual.safetensors + the exported PEFT adapter, in logits, loss and accuracy."""
    from peft import PeftModel

    from fedtune import pipeline
    from fedtune.evaluate import evaluate_classifier
    from fedtune.models import tiny_bert
    from fedtune.train import collate_for, eval_batches

    run = {**tiny_run_config, "factor-mode": "exact", "adapter": adapter}
    if adapter == "mos":
        run.update({"mos-r": 2, "mos-e": 2, "mos-p": 1})
    cfg = parse(run)
    fed = pipeline.federation(cfg)
    wb = pipeline.workbench(cfg, fed)
    layers = exact.exact_layers(wb.model)
    state = {
        k: v + rng.normal(KEY, 300 + i, v.numel()).view_as(v) * 0.05
        for i, (k, v) in enumerate(wb.initial.items())
    }
    residual = {
        x.name: rng.normal(KEY, 400 + i, x.d_out * x.d_in).view(x.d_out, x.d_in) * 0.2
        for i, x in enumerate(layers)
    }
    server = pipeline.evaluate_state(cfg, state, residual=residual)
    without = pipeline.evaluate_state(cfg, state)
    assert server["loss"] != pytest.approx(without["loss"], rel=1e-4)  # the residual matters

    out = tmp_path / "adapter"
    adapters.load_trainable_state(wb.model, state)
    wb.adapter.export_peft(wb.model, out)
    exact.save_residual(out, residual)

    base = exact.add_residual_to_base(tiny_bert(fed.num_labels), exact.load_residual(out))
    served = PeftModel.from_pretrained(base, str(out)).eval()
    batches = list(
        eval_batches(fed.test, collate_for("classification", wb.tokenizer, cfg.max_length), 16)
    )
    res = evaluate_classifier(served, batches, torch.device("cpu"))
    assert res["accuracy"] == pytest.approx(server["accuracy"], abs=1e-9)
    assert res["loss"] == pytest.approx(server["loss"], rel=1e-5)
    adapters.load_trainable_state(wb.model, state)
    exact.set_residual(wb.model, residual)
    wb.model.eval()
    with torch.no_grad():
        b = {k: v for k, v in batches[0].items() if k != "labels"}
        torch.testing.assert_close(served(**b).logits, wb.model(**b).logits, atol=1e-5, rtol=1e-5)
    exact.set_residual(wb.model, None)  # leave the cached workbench as we found it


# ------------------------------------------------------------------------------ e2e


@pytest.mark.slow
def test_two_round_exact_simulation_exports_adapter_and_residual(tiny_run_config, tmp_path):
    """In process: exact mode through a real `flwr run` is tests/test_parity.py's
    'mos-exact-clip' case, bit-identical to this entry point."""
    import json

    from peft import PeftModel

    from fedtune import pipeline
    from fedtune.models import tiny_bert
    from fedtune.simulate import Simulation, build_config

    run = {**tiny_run_config, "factor-mode": "exact"}
    kv = " ".join(f"{k}={json.dumps(v)}" for k, v in run.items())
    Simulation(build_config([kv]), echo=lambda s: None).run()
    (run_dir,) = list((tmp_path / "runs").iterdir())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["valid-replies"] == 3 for r in rows[1:])
    assert (run_dir / "checkpoint" / "residual.safetensors").is_file()
    residual = exact.load_residual(run_dir / "adapter")
    assert residual and all(float(v.abs().max()) > 0 for v in residual.values())
    cfg = parse(run)
    base = exact.add_residual_to_base(tiny_bert(pipeline.federation(cfg).num_labels), residual)
    res = held_out_metrics(PeftModel.from_pretrained(base, str(run_dir / "adapter")), cfg)
    assert res["accuracy"] == pytest.approx(rows[-1]["test-accuracy"], abs=1e-9)
    assert res["loss"] == pytest.approx(rows[-1]["test-loss"], rel=1e-4)
