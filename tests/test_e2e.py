"""End to end: a real 2-round `flwr run` simulation with a tiny model, and the saved adapter."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune import pipeline
from fedtune.config import parse
from fedtune.launch import main as launch
from fedtune.simulate import Simulation, build_config
from tests.test_parity import assert_same_run


def _environ(pid: int) -> list[str]:
    """A process's environment ([] once it is gone or not ours to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _kv(cfg: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())


@pytest.mark.slow
def test_two_round_simulation_saves_a_peft_adapter_that_reproduces_accuracy(
    tiny_run_config, tmp_path, capsys
):
    from fedtune.launch import _process_table, _state

    def ours() -> set[int]:
        """Live processes this test's simulation starts: the launcher gives each its FLWR_HOME
        (a launch on the other xdist worker, or anything else on this machine, has another)."""
        return {
            pid
            for pid, (_, cmd) in _process_table().items()
            if _state(pid) not in ("", "Z")
            and home in _environ(pid)
            and (
                "flower-superlink" in cmd
                or "flwr-simulation" in cmd
                or "ray::" in cmd
                or "raylet" in cmd
            )
        }

    home = f"FLWR_HOME={(tmp_path / 'flwr-home').resolve()}"
    before = ours()
    rc = launch(["-c", _kv(tiny_run_config), "--flwr-home", str(tmp_path / "flwr-home")])
    out = capsys.readouterr().out
    assert rc == 0, out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    # nothing of the run is left behind: SuperLink, simulation process, Ray
    left = ours() - before
    assert not left, [_process_table()[p][1][:120] for p in left if p in _process_table()]
    # parity case (a) of issue 16 (tests/test_parity.py has the others): the in-process
    # simulator gives the same run bit for bit
    sim = {**tiny_run_config, "output-dir": str(tmp_path / "sim"), "run-name": "sim"}
    Simulation(build_config([_kv(sim)]), echo=lambda s: None).run()
    assert_same_run(tmp_path / "sim" / "sim", runs[0])
    rows = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["valid-replies"] == 3 for r in rows[1:])
    assert rows[1]["bytes-up"] > 0 and rows[1]["bytes-down"] > 0
    # the printed table and the JSONL agree
    assert f"{rows[-1]['test-accuracy']:.4f}" in out

    # the saved adapter reloads with PEFT and reproduces the reported held-out accuracy
    from peft import PeftModel

    from fedtune.models import tiny_bert
    from tests.helpers import held_out_metrics

    cfg = parse(tiny_run_config)
    base = tiny_bert(pipeline.federation(cfg).num_labels)
    res = held_out_metrics(PeftModel.from_pretrained(base, str(runs[0] / "adapter")), cfg)
    assert res["accuracy"] == pytest.approx(rows[-1]["test-accuracy"], abs=1e-9)
    assert res["loss"] == pytest.approx(rows[-1]["test-loss"], rel=1e-4)


def test_bad_config_stops_with_one_line_before_flower_starts(tmp_path, capsys):
    rc = launch(["-c", "local-steps='many'", "--flwr-home", str(tmp_path / "h")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "'local-steps'" in err and "integer" in err
    assert not (tmp_path / "h").exists()


def test_missing_data_file_stops_with_one_line(tmp_path, capsys):
    rc = launch(
        [
            "-c",
            "dataset='file' data-path='/no/such.csv' partitioning='iid' num-partitions=2",
            "--flwr-home",
            str(tmp_path / "h"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "/no/such.csv" in err and "does not exist" in err


def test_run_dirs_are_never_reused(tmp_path):
    from fedtune.metrics import create_run_dir

    a = create_run_dir(tmp_path, "x")
    (a / "metrics.jsonl").write_text("{}\n")
    b = create_run_dir(tmp_path, "x")
    assert a != b and (a / "metrics.jsonl").read_text() == "{}\n"


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny_run_config, tmp_path):
    """Kill the whole simulation (server included) after a random round, resume, compare
    with an uninterrupted run.

        The tiny model's rounds take a fraction of a second on a fast machine, so the kill is a
        SIGKILL of the server's tree first (no SIGTERM grace in which rounds go on) and the run
        has rounds to spare after the earliest kill point.
    """
    import contextlib
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from fedtune import checkpoint
    from fedtune.launch import stop_superlink

    rounds = 6
    cfg = {**tiny_run_config, "num-rounds": rounds, "codec": "srht", "run-name": "full"}
    # the uninterrupted reference runs in process: tests/test_parity.py pins fedtune.simulate
    # to `flwr run` bit for bit, and the interrupted run below is a real `flwr run`
    Simulation(build_config([_kv(cfg)]), echo=lambda s: None).run()

    kill_after = random.Random(1234).choice([1, 2])  # a "random" round, reproducibly
    home = tmp_path / "h2"
    part = {**cfg, "run-name": "part"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.launch", "-c", _kv(part), "--flwr-home", str(home)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = tmp_path / "runs" / "part"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(checkpoint.CheckpointError):  # none yet, or mid-rename
                if checkpoint.load(run_dir).round >= kill_after:
                    break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint appeared")
    finally:
        stop_superlink(home.resolve(), hard=True)  # the server lives in the SuperLink's tree
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = checkpoint.load(run_dir).round
    assert killed_at < rounds, "the run ended before the kill reached it"

    resumed = {**part, "resume": str(run_dir)}
    assert launch(["-c", _kv(resumed), "--flwr-home", str(home)]) == 0
    a = load_file(str(tmp_path / "runs" / "full" / "checkpoint" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "runs" / "part" / "checkpoint" / "adapter.safetensors"))
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), f"differs after a kill at round {killed_at}"
    rows = [
        json.loads(x)["round"]
        for x in (tmp_path / "runs" / "part" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows == list(range(rounds + 1))


def test_resume_with_a_changed_config_is_refused(tmp_path):
    from fedtune import checkpoint

    ck = checkpoint.Checkpoint(
        1, 0, {"lr": 0.1, "num-rounds": 2}, {"w": torch.zeros(2)}, {"step": 1}, {}
    )
    checkpoint.save(tmp_path, ck)
    back = checkpoint.load(tmp_path)
    assert (
        back.round == 1
        and torch.equal(back.adapter["w"], torch.zeros(2))
        and back.server_opt["step"] == 1
    )
    checkpoint.check_compatible(back.config, {"lr": 0.1, "num-rounds": 5})
    with pytest.raises(checkpoint.CheckpointError, match="lr"):
        checkpoint.check_compatible(back.config, {"lr": 0.2, "num-rounds": 2})
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nothing")


def test_a_kill_between_the_checkpoint_renames_loses_nothing(tmp_path):
    """save() moves the old checkpoint aside, then the new one in: a kill between the two
    leaves no ``checkpoint/``; load() must find the previous one, and the next save tidies."""
    from fedtune import checkpoint

    def ck(r: int) -> checkpoint.Checkpoint:
        return checkpoint.Checkpoint(r, 0, {"lr": 0.1}, {"w": torch.full((2,), r)}, {}, {})

    checkpoint.save(tmp_path, ck(1))
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old-4242")  # the killed save's step 1
    (tmp_path / ".checkpoint.tmp-4242").mkdir()  # and its new, never-renamed copy (partial)
    back = checkpoint.load(tmp_path)
    assert back.round == 1 and torch.equal(back.adapter["w"], torch.full((2,), 1))
    checkpoint.save(tmp_path, ck(2))
    assert checkpoint.load(tmp_path).round == 2
    assert not list(tmp_path.glob(".checkpoint.*"))  # neither copy is left behind


@pytest.mark.slow
def test_compare_script_on_a_tiny_model(tiny_run_config, tmp_path):
    import simulations.compare as compare

    common = {k: v for k, v in tiny_run_config.items() if k != "output-dir"}
    rc = compare.main(
        [
            "simulations/a_lora_dense_fedavg.toml",
            "simulations/d_mos_srht_ties.toml",
            "--common",
            _kv({**common, "num-rounds": 2, "mos-r": 3}),
            "--out",
            str(tmp_path / "cmp"),
            "--in-process",  # what this proves is the script: flwr run is tested above
            "--no-write",
        ]
    )
    assert rc == 0
    (run,) = list((tmp_path / "cmp").iterdir())
    report = (run / "report.md").read_text()
    assert "a_lora_dense_fedavg" in report and "d_mos_srht_ties" in report
    assert (run / "compare.png").stat().st_size > 1000


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_superlink_simulation_and_ray(tiny_run_config, tmp_path):
    """`kill <launcher>` (or a CI timeout) must not leave a SuperLink, simulation or Ray behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fedtune.launch import _process_table, _state

    def descendants(root: int) -> set[int]:
        table, out, todo = _process_table(), set(), [root]
        while todo:
            parent = todo.pop()
            for pid, (ppid, _) in table.items():
                if ppid == parent and pid not in out and _state(pid) not in ("", "Z"):
                    out.add(pid)
                    todo.append(pid)
        return out

    cfg = {**tiny_run_config, "num-rounds": 50, "run-name": "long"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedtune.launch",
            "-c",
            _kv(cfg),
            "--flwr-home",
            str(tmp_path / "h"),
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "runs" / "long" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "no round finished"
            time.sleep(0.2)
        tree = descendants(proc.pid)
        assert tree, "the launcher has no child processes to stop"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) != 0
        time.sleep(1.0)
        left = {p for p in tree if _state(p) not in ("", "Z")}
        assert not left, [_process_table().get(p, (0, "?"))[1][:120] for p in left]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
