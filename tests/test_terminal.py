"""A quiet terminal (issue 18): library output goes to runs/<run>/log.txt, fedtune's lines to
stdout; every run writes curves.png and a `seconds` per round; the launcher sizes the
federation with --federation-config instead of the deprecated `options.` fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedtune import report

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600):
    """A fresh interpreter: pytest's own warning capture would hide what the routing does."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_a_library_warning_and_log_record_land_in_the_log_file_not_on_the_terminal(tmp_path):
    log = tmp_path / "run" / "log.txt"
    proc = _run_python(
        """
        import logging, sys, warnings
        from pathlib import Path
        from fedtune import report
        report.route_library_output(Path(sys.argv[1]))
        import transformers  # installs its own stderr handler, which must stay silent
        transformers.logging.get_logger("transformers.modeling_utils").warning("LOAD REPORT x")
        warnings.warn("`old_api` is deprecated", FutureWarning)
        logging.getLogger("ray.tune").warning("ray tip")
        print("fedtune: our line")
        """,
        str(log),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "fedtune: our line\n"
    assert proc.stderr == ""
    text = log.read_text()
    for what in ("LOAD REPORT x", "FutureWarning: `old_api` is deprecated", "ray tip"):
        assert what in text, text


def test_verbose_shows_library_warnings_on_the_terminal_too(tmp_path):
    log = tmp_path / "log.txt"
    proc = _run_python(
        """
        import sys, warnings
        from pathlib import Path
        from fedtune import report
        report.route_library_output(Path(sys.argv[1]), verbose=report.verbose_from_env())
        warnings.warn("`old_api` is deprecated", FutureWarning)
        """,
        str(log),
        env={"FEDTUNE_VERBOSE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "`old_api` is deprecated" in proc.stderr
    assert "`old_api` is deprecated" in log.read_text()


def test_move_log_keeps_what_was_logged_before_the_run_folder_existed(tmp_path):
    proc = _run_python(
        """
        import sys, warnings
        from pathlib import Path
        from fedtune import report
        report.route_library_output(Path(sys.argv[1]))
        warnings.warn("before", UserWarning)
        report.move_log(Path(sys.argv[2]))
        warnings.warn("after", UserWarning)
        report.close_log()
        """,
        str(tmp_path / "tmp.log"),
        str(tmp_path / "run" / "log.txt"),
    )
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "run" / "log.txt").read_text()
    assert "before" in text and "after" in text
    assert not (tmp_path / "tmp.log").exists()


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        # fedtune's own lines from the ServerApp's log, with Flower's colours
        (
            "\x1b[92mINFO \x1b[0m:      fedtune: round   1 | train loss 1.1017\n",
            "fedtune: round   1 | train loss 1.1017",
        ),
        # a ClientApp's own line, behind Ray's actor prefix
        (
            "\x1b[36m(ClientAppActor pid=4743)\x1b[0m fedtune: injected fault 'hang' in client 0\n",
            "fedtune: injected fault 'hang' in client 0",
        ),
        # the strategy's per-round warnings
        (
            "\x1b[93mWARNING \x1b[0m:   round 1: dropped update of slot 2: norm 5 (clip-reject 10)",
            "fedtune: round 1: dropped update of slot 2: norm 5 (clip-reject 10)",
        ),
        ("\x1b[91mERROR \x1b[0m:     ServerApp raised an exception", "error: ServerApp raised an exception"),
        # everything else is the log's
        ("\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed", None),
        ("\x1b[92mINFO \x1b[0m:      [ROUND 1/2]", None),
        ("\x1b[92mINFO \x1b[0m:      round 1: sampled 3 of 3 nodes", None),
        ("⚠️ Warning: `options.` fields in the SuperLink connection configuration are deprecated.", None),
        (
            "/x/transformers/modeling_utils.py:3312: FutureWarning: `is_gradient_checkpointing` is deprecated",
            None,
        ),
        (
            "\x1b[36m(ClientAppActor pid=4743)\x1b[0m /x/ray/worker.py:2051: FutureWarning: Tip",
            None,
        ),
        ("Successfully started run 3784946828292681786", None),
        ("  warnings.warn(", None),
        ("Traceback (most recent call last):", None),
    ],
)
def test_the_terminal_shows_fedtunes_lines_and_errors_only(raw, shown):
    assert report.terminal_line(raw) == shown


def test_the_federation_is_sized_by_federation_config_not_deprecated_options(tmp_path):
    from fedtune.launch import federation_config, write_federation

    write_federation(tmp_path)
    text = (tmp_path / "config.toml").read_text()
    assert "options." not in text and 'address = ":local:"' in text
    fc = federation_config(1000, 2)
    assert fc == "num-supernodes=1000 client-resources-num-cpus=2 client-resources-num-gpus=0.0"
    # the keys are the fields of Flower's SimulationConfig, as `flwr run` converts them
    from flwr.supercore.utils import simulation_config_from_json

    from fedtune.launch import parse_overrides

    sim = simulation_config_from_json(
        {k.replace("-", "_"): v for k, v in parse_overrides([fc]).items()}
    )
    assert sim.num_supernodes == 1000 and sim.client_resources_num_cpus == 2


def test_a_folder_holding_only_the_launchers_log_is_the_run_folder(tmp_path):
    from fedtune.metrics import create_run_dir

    a = create_run_dir(tmp_path, "x")
    (a / "log.txt").write_text("preflight\n")
    assert create_run_dir(tmp_path, "x") == a  # the ServerApp opens the launcher's folder
    (a / "metrics.jsonl").write_text("{}\n")
    assert create_run_dir(tmp_path, "x") != a  # an earlier run is never reused


def test_the_plot_has_both_x_axes_and_the_final_lines_name_it(tmp_path):
    rows = [
        {"round": 0, "test-accuracy": 0.5, "test-loss": 1.1, "bytes-up": 0, "seconds": 1.0},
        {"round": 1, "test-accuracy": 0.6, "test-loss": 0.9, "bytes-up": 1000, "seconds": 9.0},
        {"round": 2, "test-accuracy": 0.7, "test-loss": 0.8, "bytes-up": 1000, "seconds": 8.0},
    ]
    assert report.cumulative_uplink(rows) == [0, 1000, 2000]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = report.plot_curves(rows, tmp_path / report.PLOT_NAME)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.final_lines(tmp_path)
    assert f"fedtune: plot    {path}" in text
    assert "2 rounds in 17 s (8.5 s a round)" in text
    assert text.count("fedtune run") == 1  # the table, once


@pytest.mark.slow
def test_simulate_prints_a_short_run_and_writes_plot_seconds_and_log(tiny_run_config, tmp_path):
    """`python -m fedtune.simulate` of 5 rounds: a header, one line a round, the table once and
    the paths, in at most 30 lines; the libraries' warnings are in log.txt only."""
    cfg = {**tiny_run_config, "num-rounds": 5, "run-name": "quiet"}
    kv = " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.simulate", "-c", kv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "FEDTUNE_VERBOSE"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) <= 30, proc.stdout
    assert "Warning" not in proc.stdout and "warn" not in proc.stderr, proc.stderr
    run = Path(cfg["output-dir"]) / "quiet"
    assert sum("| held-out acc" in x for x in lines) == 6  # rounds 0..5, each once
    assert proc.stdout.count("fedtune run") == 1
    assert lines[-4] == f"fedtune: plot    {run / 'curves.png'}"
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["seconds"] > 0 and r["eval-seconds"] > 0 for r in rows)
    assert all(0 < r["wait-seconds"] < r["seconds"] for r in rows[1:])
    assert (run / "log.txt").exists()


def test_no_progress_bars_not_even_flwr_datasets_plain_tqdm():
    """The natural-id partitioner draws a bare tqdm bar on every federation build."""
    proc = _run_python(
        """
        from fedtune import report
        report.quiet_progress_bars()
        from flwr_datasets.partitioner import natural_id_partitioner as m
        for _ in m.tqdm(range(3), desc="Generating partition_id_to_indices"):
            pass
        import os
        print(os.environ["TQDM_DISABLE"])  # what the SuperLink, ServerApp and actors inherit
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "1\n" and "Generating" not in proc.stderr
