"""One round, two entry points: ``fedtune.simulate`` and a real ``flwr run`` (through
``fedtune.launch``) give bit-identical global adapters after 2 rounds on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune import checkpoint
from fedtune.launch import main as launch
from fedtune.simulate import Simulation, build_config

CASES = {
    "dense-fedavg": {},
    "srht-ef-ties": {
        "codec": "srht",
        "codec-k": 256,
        "codec-coef-bits": 8,
        "error-feedback": True,
        "merger": "ties",
        "merger-density": 0.3,
    },
    "mos-exact-clip": {
        "adapter": "mos",
        "factor-mode": "exact",
        "clip-norm": 1.0,
        "clip-mode": "median",
        "target-modules": "query,value",
        "mos-r": 3,  # tiny-bert has 2 layers: r - p <= (e - p) * L
    },
}


def _kv(cfg: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_simulate_and_flwr_run_give_bit_identical_adapters(case, tiny_run_config, tmp_path):
    run_config = {**tiny_run_config, **CASES[case]}
    sim = Simulation(build_config([_kv({**run_config, "run-name": "sim"})]), echo=lambda s: None)
    sim.run()
    rc = launch(
        ["-c", _kv({**run_config, "run-name": "flwr"}), "--flwr-home", str(tmp_path / "home")]
    )
    assert rc == 0
    a = checkpoint.load(sim.folder.path)
    b = checkpoint.load(tmp_path / "runs" / "flwr")
    assert a.round == b.round == 2
    assert list(a.adapter) == list(b.adapter)
    differ = [k for k in a.adapter if not torch.equal(a.adapter[k], b.adapter[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    for k in a.residual:  # exact mode: the base-weight residual as well
        assert torch.equal(a.residual[k], b.residual[k]), k
    # the same rounds were recorded: accuracy, loss and uplink bytes
    rows = [
        [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
        for p in (sim.folder.path, tmp_path / "runs" / "flwr")
    ]
    keys = ("round", "test-accuracy", "test-loss", "bytes-up", "valid-replies")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
