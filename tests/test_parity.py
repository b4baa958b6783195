"""One round, two entry points: ``fedtune.simulate`` and a real ``flwr run`` (through
``fedtune.launch``) give bit-identical global adapters after 2 rounds on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtune import checkpoint
from fedtune.launch import main as launch
from fedtune.simulate import Simulation, build_config

# (a) dense FedAvg is checked inside tests/test_e2e.py's two-round run (the same config):
# its `flwr run` serves both tests, one Ray start-up fewer in `make test`
CASES = {
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


def assert_same_run(sim_dir: Path, flwr_dir: Path, rounds: int = 2) -> None:
    """The two run folders hold bit-identical global adapters (and exact-mode residuals) and
    the same recorded rounds: accuracy, loss, uplink bytes, replies."""
    a = checkpoint.load(sim_dir)
    b = checkpoint.load(flwr_dir)
    assert a.round == b.round == rounds
    assert list(a.adapter) == list(b.adapter)
    differ = [k for k in a.adapter if not torch.equal(a.adapter[k], b.adapter[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    for k in a.residual:  # exact mode: the base-weight residual as well
        assert torch.equal(a.residual[k], b.residual[k]), k
    rows = [
        [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
        for p in (sim_dir, flwr_dir)
    ]
    keys = ("round", "test-accuracy", "test-loss", "bytes-up", "valid-replies")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]


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
    assert_same_run(sim.folder.path, tmp_path / "runs" / "flwr")
