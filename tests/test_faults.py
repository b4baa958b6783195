"""Dropouts and stragglers (issue: reliability): clients that raise, hang past the round
timeout or exit, injected with the ``fault*`` run-config keys (fedtune/faults.py).

The unit tests check the hook; the slow tests run real ``flwr run`` simulations through
``python -m fedtune.launch`` and check that every round ends, with the survivors or skipped,
and that the whole run ends in bounded time. The deployment case (a SuperNode process killed
during a run) is in tests/test_deploy.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune import faults, parts
from fedtune.config import ConfigError, parse
from tests.test_strategy import _task_identity  # noqa: F401  (autouse: Flower's run identity)

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**kv):
    return parse({k.replace("_", "-"): v for k, v in kv.items()})


def test_only_the_chosen_clients_and_rounds_fail():
    cfg = _cfg(fault="raise", fault_clients="0,3", fault_rounds="2")
    assert faults.applies(cfg, 0, 2) and faults.applies(cfg, 3, 2)
    assert not faults.applies(cfg, 1, 2) and not faults.applies(cfg, 0, 1)
    every_round = _cfg(fault="raise", fault_clients="1")
    assert all(faults.applies(every_round, 1, r) for r in (1, 2, 7))
    assert not faults.applies(_cfg(fault="none", fault_clients="0"), 0, 1)
    faults.inject(cfg, 1, 2)  # not chosen: returns
    with pytest.raises(faults.InjectedFault, match="client 3, round 2"):
        faults.inject(cfg, 3, 2)


def test_hang_blocks_for_fault_seconds_then_returns(capsys):
    cfg = _cfg(fault="hang", fault_clients="0", fault_seconds=0.3)
    t0 = time.monotonic()
    faults.inject(cfg, 0, 1)
    assert time.monotonic() - t0 >= 0.3
    assert "injected fault 'hang' in client 0, round 1" in capsys.readouterr().err


def test_exit_ends_the_process_without_a_reply():
    code = (
        "from fedtune import faults; from fedtune.config import parse;"
        "faults.inject(parse({'fault': 'exit', 'fault-clients': '2'}), 2, 1);"
        "print('still here')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == faults.EXIT_CODE and "still here" not in proc.stdout


@pytest.mark.parametrize("key", ["fault-clients", "fault-rounds"])
def test_bad_fault_lists_fail_when_the_config_is_parsed(key):
    with pytest.raises(ConfigError, match=f"'{key}'.*comma list of integers"):
        parse({key: "0,x"})
    with pytest.raises(ConfigError, match="'fault'"):
        parse({"fault": "crash"})


def test_the_strategy_waits_at_most_round_timeout_and_names_the_silent_nodes(caplog):
    """``send_and_receive(timeout=round-timeout)`` bounds each round: what arrived is merged,
    the sampled nodes that stayed silent are named, and the run goes on."""
    import logging

    from flwr.app import MessageType

    from fedtune import codecs
    from fedtune.fl.loop import run_rounds
    from fedtune.fl.records import key_from_config, state_to_record
    from tests.test_strategy import _delta, _grid, _reply, _strategy

    s, spec = _strategy(min_valid=2)
    grid = _grid()
    identify = grid.send_and_receive.side_effect
    timeouts = []

    def send_and_receive(msgs, timeout):
        msgs = list(msgs)
        timeouts.append(timeout)
        if msgs[0].metadata.message_type == MessageType.QUERY:
            return identify(msgs, timeout)
        replies = []
        for m in msgs:
            if m.metadata.dst_node_id == 303:  # hangs: no reply within the timeout
                continue
            cfg = m.content["config"]
            key, rnd, slot = key_from_config(cfg), int(cfg["server-round"]), int(cfg["slot"])
            payload = codecs.get("dense").encode(_delta(1.0), key, round=rnd, slot=slot)
            replies.append(_reply(m.metadata.dst_node_id, payload))
        return replies

    grid.send_and_receive.side_effect = send_and_receive
    flwr_log = logging.getLogger("flwr")
    # other tests in this worker process may have routed or silenced handlers (fedtune.report)
    saved = (flwr_log.level, flwr_log.disabled, caplog.handler.level)
    flwr_log.setLevel(logging.INFO)
    flwr_log.disabled = False
    caplog.handler.setLevel(logging.NOTSET)
    flwr_log.addHandler(caplog.handler)
    try:
        run_rounds(s, grid, state_to_record(spec), first_round=1, num_rounds=2, timeout=7.0)
    finally:
        flwr_log.removeHandler(caplog.handler)
        flwr_log.setLevel(saved[0])
        flwr_log.disabled = saved[1]
        caplog.handler.setLevel(saved[2])
    assert timeouts == [s.node_wait, 7.0, 7.0]  # the identity query, then one call per round
    assert [(h.valid, h.skipped) for h in s.history] == [(2, False), (2, False)]
    line = "round 1: no reply within round-timeout=7 s from 1 of 3 sampled nodes (slots 2)"
    assert line in caplog.text


def test_the_launcher_stops_a_simulation_that_outlives_its_server(tmp_path, capsys):
    """Flower's simulation waits for every running ClientApp; the launcher does not wait
    long once the server has saved the final adapter (and not at all for an old one)."""
    from fedtune.launch import run_flwr

    done = tmp_path / "adapter_model.safetensors"
    env = dict(os.environ)
    slow = [sys.executable, "-c", "import time; time.sleep(3)"]
    touch = [sys.executable, "-c", f"open({str(done)!r}, 'w'); import time; time.sleep(600)"]
    assert run_flwr(slow, env, done, 0.5) == 0  # no adapter: waits for flwr to end
    done.write_bytes(b"old")
    os.utime(done, (0, 0))  # from an earlier run: not a sign that this one finished
    assert run_flwr(slow, env, done, 0.5) == 0
    t0 = time.monotonic()
    assert run_flwr(touch, env, done, 0.5) != 0  # written now: stopped after the grace
    assert time.monotonic() - t0 < 30
    assert "still waiting for a ClientApp after 0 s" in capsys.readouterr().err


def test_stopping_one_runs_superlink_leaves_a_run_with_a_longer_name_alone(tmp_path):
    """Runs 'exp1' and 'exp10' side by side: starting (or stopping) exp1 stops the SuperLink
    of exp1's home only. Before session 5 a substring test on the home path killed exp10's too."""
    from fedtune.launch import _state, _superlink_db, stop_superlink

    def fake_superlink(home: Path) -> subprocess.Popen[bytes]:
        db = _superlink_db(home.resolve())
        # extra arguments after -c land in sys.argv: a process whose command line looks like one
        code = "import time; time.sleep(120)"
        return subprocess.Popen(
            [sys.executable, "-c", code, "flower-superlink", "--database", str(db), "--insecure"],
            start_new_session=True,
        )

    one, ten = fake_superlink(tmp_path / "exp1"), fake_superlink(tmp_path / "exp10")
    try:
        time.sleep(0.5)  # let both exec
        assert stop_superlink(tmp_path / "exp1", grace=10) == 1
        one.wait(timeout=10)
        assert _state(ten.pid) not in ("", "Z"), "the other run's SuperLink was stopped too"
        assert stop_superlink(tmp_path / "exp10", grace=10) == 1
        ten.wait(timeout=10)
    finally:
        for p in (one, ten):
            p.kill()
            p.wait()


# --------------------------------------------------------------------------- simulations
SIM_LIMIT_S = 420  # the whole run, on a loaded 2-core machine; it must never hang
LAUNCH = ["--num-cpus", "1", "--stop-grace", "20"]


def _simulate(cfg: dict, tmp_path: Path, name: str) -> tuple[int, str, float, list[dict]]:
    """Run ``python -m fedtune.launch`` in its own session; kill it past SIM_LIMIT_S.

    Returns (exit code, output, seconds, metrics rows). ``--num-cpus 1`` gives the Ray pool
    one actor per CPU: a hanging client holds one actor, the others run on the rest.
    """
    from fedtune.launch import stop_superlink

    kv = " ".join(f"{k}={json.dumps(v)}" for k, v in {**cfg, "run-name": name}.items())
    home = (tmp_path / f"home-{name}").resolve()
    log = tmp_path / f"{name}.log"
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune.launch", "-c", kv, "--flwr-home", str(home), *LAUNCH],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=SIM_LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -1
        finally:
            stop_superlink(home)
    elapsed = time.monotonic() - t0
    text = log.read_text(errors="replace")
    metrics = Path(cfg["output-dir"]) / name / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    assert rc != -1, f"the run did not end within {SIM_LIMIT_S} s:\n{text[-4000:]}"
    return rc, text, elapsed, rows


@pytest.mark.slow
def test_a_client_hanging_past_the_round_timeout_is_left_behind(tiny_run_config, tmp_path):
    timeout = 40.0  # also bounds the first contact, while the Ray actors start
    cfg = {
        **tiny_run_config,
        "round-timeout": timeout,
        "fault": "hang",
        "fault-clients": "0",
        "fault-rounds": "1",
        "fault-seconds": 3600.0,  # far past the timeout and the whole run
    }
    rc, out, elapsed, rows = _simulate(cfg, tmp_path, "hang")
    assert rc == 0, out[-4000:]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # round 1 went on without the hanging client after round-timeout s
    assert rows[1]["valid-replies"] == 2 and not rows[1]["skipped"]
    assert "injected fault 'hang' in client 0, round 1" in out
    assert f"round 1: no reply within round-timeout={timeout:.0f} s from 1 of 3 sampled" in out
    # round 2: its next message runs on another Ray actor and it trains again
    assert rows[2]["valid-replies"] == 3 and not rows[2]["skipped"]
    assert elapsed > timeout
    # the hanging ClientApp would keep Flower's simulation open for an hour: the launcher
    # stops it once the server has saved the final adapter
    assert "the simulation is still waiting for a ClientApp" in out
    assert (Path(cfg["output-dir"]) / "hang" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_too_few_replies_skip_the_round_and_the_run_still_ends(tiny_run_config, tmp_path):
    cfg = {
        **tiny_run_config,
        "min-train-nodes": 3,
        "min-available-nodes": 3,
        "round-timeout": 120.0,  # nobody hangs here: every client answers
        "fault": "raise",
        "fault-clients": "1",
        "fault-rounds": "1",
    }
    rc, out, _, rows = _simulate(cfg, tmp_path, "skip")
    assert rc == 0, out[-4000:]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["skipped"] and rows[1]["valid-replies"] == 2
    assert rows[1]["dropped-replies"] == 1
    assert "round 1: only 2 valid replies (< 3): keeping the previous global adapter" in out
    # the dropped reply's reason, in one line on the terminal (the traceback goes to log.txt)
    assert "injected fault 'raise' in client 1, round 1" in out
    # the skipped round kept the global adapter: same held-out result as before round 1
    assert rows[1]["test-loss"] == rows[0]["test-loss"]
    assert not rows[2]["skipped"] and rows[2]["valid-replies"] == 3


@pytest.mark.slow
def test_boosted_attackers_are_dropped_by_clip_reject_in_a_real_run(tiny_run_config, tmp_path):
    """A real run (the in-process simulator: the same clients, attack wrapper and server round
    as ``flwr run``, tests/test_parity.py) with one of 5 clients sending -100x updates: every
    round drops exactly that client, with the reason in the log, and merges the other four."""
    from fedtune.simulate import Simulation

    cfg = {
        **tiny_run_config,
        "num-partitions": 5,
        "attack": "sign-flip",
        "attack-fraction": 0.2,
        "attack-scale": 100.0,
        "clip-norm": 1.0,
        "clip-mode": "median",
        "clip-reject": 10.0,
        "run-name": "reject",
    }
    (bad,) = parts.attackers(parse(cfg), 5)
    lines: list[str] = []
    Simulation(parse(cfg), echo=lines.append).run()
    out = "\n".join(lines)
    metrics = Path(cfg["output-dir"]) / "reject" / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["valid-replies"] == 4 and r["dropped-replies"] == 1 and not r["skipped"]
    for rnd in (1, 2):
        assert f"round {rnd}: dropped update of slot {bad}: norm" in out
    assert out.count("(clip-reject 10)") == 2
