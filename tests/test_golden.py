"""Golden loss: training improves the model by a recorded amount.

Tiny BERT, 3 IID clients of the built-in test CSV, fixed keys (seed 0), 3 rounds of FedAvg
through the in-process simulator (the same round code as Flower). From round 1 on the
held-out loss must strictly decrease and match the recorded values within ``TOL``; round 1
itself is above round 0 (the freshly initialised head first over-shoots towards one class),
so the test pins that too rather than hiding it. ``TOL`` allows for other CPUs' float
kernels (the values below are from torch 2.13 on x86-64); a change to the training, the
round or the data path moves them by much more.
"""

from __future__ import annotations

import json

import pytest

from fedtune.simulate import Simulation, build_config

RECORDED = {0: 1.0952, 1: 1.1417, 2: 0.6895, 3: 0.2683}  # held-out loss after each round
TOL = 0.03


def test_three_rounds_lower_the_held_out_loss_by_the_recorded_amount(tiny_run_config):
    rc = {
        **tiny_run_config,
        "num-rounds": 3,
        "local-steps": 10,
        "batch-size": 16,
        "lr": 0.03,
        "run-name": "golden",
    }
    kv = " ".join(f"{k}={json.dumps(v)}" for k, v in rc.items())
    sim = Simulation(build_config([kv]), echo=lambda s: None)
    sim.run()
    rows = [json.loads(x) for x in (sim.folder.path / "metrics.jsonl").read_text().splitlines()]
    loss = {r["round"]: r["test-loss"] for r in rows}
    assert loss[1] > loss[2] > loss[3], loss
    assert loss[3] < 0.5 * loss[0], loss
    for t, want in RECORDED.items():
        assert loss[t] == pytest.approx(want, abs=TOL), (t, loss)
