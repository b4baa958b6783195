"""End to end: distributed DP summed under SecAgg+ through Flower (fedtune.launch, Ray: the
SecAgg+ workflow and client mod are Flower's), and central DP in process (fedtune.simulate,
the same ServerRound; tests/test_parity.py pins the two entry points together), each a
2-round run; epsilon per round lands in metrics.jsonl."""

from __future__ import annotations

import json

import dp_accounting as dpa
import pytest

from fedtune.launch import main as launch
from fedtune.simulate import Simulation, build_config


def _kv(cfg: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        {"dp": "distributed", "secagg": "secaggplus", "dp-noise-multiplier": 0.5},
        {"dp": "central", "dp-noise-multiplier": 0.5},
    ],
    ids=["distributed-secagg", "central"],
)
def test_private_flower_run(tiny_run_config, tmp_path, capsys, extra):  # type: ignore[no-untyped-def]
    cfg = {**tiny_run_config, **extra, "fraction-train": 1.0, "dp-seeded-noise": True}
    if cfg.get("secagg"):
        rc = launch(["-c", _kv(cfg), "--flwr-home", str(tmp_path / "flwr-home")])
        out = capsys.readouterr().out
        assert rc == 0, out
    else:
        Simulation(build_config([_kv(cfg)]), echo=lambda s: None).run()
    (run,) = list((tmp_path / "runs").iterdir())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for t, r in enumerate(rows[1:], start=1):
        assert r["valid-replies"] == 3 and not r["skipped"]
        acc = dpa.rdp.RdpAccountant()  # q = 1: every round is the plain Gaussian mechanism
        acc.compose(dpa.GaussianDpEvent(0.5), t)
        assert r["dp-epsilon"] == pytest.approx(acc.get_epsilon(1 / 3))
