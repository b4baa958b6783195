"""Causal LM end to end: a tiny random Llama, 2 rounds, LoRA and MoS, dense and srht.

The real-model run goes through `flwr run` once (MoS + srht, the combination with the most
parts); the other three run in process (``fedtune.simulate``), which tests/test_parity.py
pins to give bit-identical rounds, so a 2-core `make test` does not start Ray four times."""

from __future__ import annotations

import json
import math

import pytest

from fedtune.launch import main as launch
from fedtune.simulate import Simulation, build_config


def _kv(cfg: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "mos"])
@pytest.mark.parametrize("codec", ["dense", "srht"])
def test_tiny_llama_two_rounds(adapter, codec, tmp_path):
    cfg = {
        "task": "causal-lm",
        "model": "tiny-llama",
        "dataset": "chatterbot",
        "partitioning": "iid",
        "num-partitions": 2,
        "max-examples-per-client": 24,
        "max-test-examples": 8,
        "max-length": 48,
        "batch-size": 4,
        "local-steps": 2,
        "num-rounds": 2,
        "eval-batch-size": 8,
        "adapter": adapter,
        "target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "mos-r": 3,  # tiny model: 2 layers -> r - p <= (e - p) * L
        "codec": codec,
        "output-dir": str(tmp_path / "runs"),
        "run-name": "lm",
    }
    if (adapter, codec) == ("mos", "srht"):
        rc = launch(["-c", _kv(cfg), "--flwr-home", str(tmp_path / "home")])
        assert rc == 0
    else:
        Simulation(build_config([_kv(cfg)]), echo=lambda s: None).run()
    run = tmp_path / "runs" / "lm"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # perplexity is exp of the answer loss, and training moved the model (a round that
    # applied nothing, or an evaluation that ignores the adapter, leaves the loss unchanged)
    assert all(
        r["test-perplexity"] == pytest.approx(math.exp(r["test-loss"]), rel=1e-5) for r in rows
    )
    assert rows[2]["test-loss"] != rows[0]["test-loss"]
    assert all(r["valid-replies"] == 2 for r in rows[1:])
    gens = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert {g["round"] for g in gens} == {0, 1, 2} and all(
        isinstance(g["answer"], str) for g in gens
    )
    assert (run / "adapter" / "adapter_config.json").exists()
