"""``python -m fedtune.simulate``: the same clients and the same server round, in one process.

    python -m fedtune.simulate [--run-config FILE_OR_KV ...]

Same syntax and run-config keys as ``python -m fedtune.launch``; no Ray, no gRPC, no
SuperLink. Each round samples the clients the Flower strategy would sample
(:func:`fedtune.round.sample`), issues the same keys, runs the same client function
(:func:`fedtune.pipeline.client_round`), decodes with the same checks and applies the same
:class:`fedtune.round.ServerRound`, so the global adapter after every round is bit-identical
to ``fedtune.launch``'s (tests/test_parity.py). It writes the same run folder
(``metrics.jsonl``, ``config.json``, checkpoints, PEFT adapter) and resumes the same way
(``resume='runs/<run>'``).

Use it to tune, to study, and on a loaded machine; use ``fedtune.launch`` (or a deployment) to
test the system itself: Flower's messages, timeouts, process faults and the compact downlink.
What differs: clients run one after another (their wall time adds up), ``downlink`` is always
the dense adapter (the compact downlink rebuilds the same state, so results are equal but
``bytes-down`` is the dense count), and ``fault='hang'|'exit'`` is refused (there is no
process to lose); ``fault='raise'`` drops the client's reply as in Flower.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedtune import codecs, faults, parts, pipeline
from fedtune import round as rnd_
from fedtune.config import Config, ConfigError, defaults_from_pyproject
from fedtune.run import RunFolder

ROOT = Path(__file__).resolve().parents[1]
Tensors = dict[str, torch.Tensor]


class Simulation:
    """The rounds of one run, in process. ``run()`` returns the final global adapter."""

    def __init__(self, cfg: Config, echo: Any = print) -> None:
        if cfg.fault in ("hang", "exit"):
            raise ConfigError(
                f"run-config key 'fault' is {cfg.fault!r}, which fedtune.simulate cannot "
                "survive (one process); use fedtune.launch, or fault='raise'"
            )
        self.cfg, self.echo = cfg, echo
        self.fed = pipeline.federation(cfg)
        self.wb = pipeline.workbench(cfg, self.fed)
        self.codec = pipeline.codec(cfg)
        self.round = pipeline.server_round(cfg)
        self.folder = RunFolder(cfg, echo)
        self.error_feedback: dict[int, codecs.ErrorFeedback] = {}  # per client, as Context.state
        self.slot_bytes: dict[int, list[int]] = {}
        self.history: list[rnd_.RoundResult] = []

    def client(self, slot: int, state: Tensors, t: int, key: int) -> rnd_.Update:
        """One client's round as the ClientApp runs it, then decoded as the strategy does."""
        cfg = self.cfg
        faults.inject(cfg, slot, t)
        ef = None
        if cfg.error_feedback:
            ef = self.error_feedback.setdefault(slot, codecs.ErrorFeedback())
        payload, m = pipeline.client_round(
            cfg,
            slot,
            state,
            key=key,
            server_round=t,
            slot=slot,
            error_feedback=ef,
            residual=self.round.residual,
        )
        self._count(slot, up=_payload_bytes(payload))
        delta = rnd_.decode(self.codec, payload, self.wb.initial, key=key, server_round=t, slot=slot)
        return rnd_.Update(slot, delta, m["num-examples"], m.get("train-loss", math.nan), payload)

    def step(self, t: int, state: Tensors) -> tuple[rnd_.RoundResult, dict[str, Any]]:
        """Round ``t``: sample, train every sampled client, run the server round."""
        n = len(self.fed.clients)
        picks = rnd_.sample(self.cfg.seed, t, n, self.cfg.fraction_train, self.cfg.min_train_nodes)
        down = _state_bytes(state) + (_state_bytes(self.round.residual) if self.round.residual else 0)
        t0 = time.monotonic()  # the clients' share of the round (they run one after another)
        updates, dropped, up0 = [], {}, self._total_up()
        for slot in picks:
            self._count(slot, down=down)
            try:
                updates.append(self.client(slot, state, t, rnd_.client_key(self.cfg.seed, t, slot)))
            except (ValueError, KeyError, TypeError, faults.InjectedFault) as e:
                dropped[slot] = f"{type(e).__name__}: {e}"
                self.echo(f"fedtune: round {t}: dropped reply of slot {slot}: {dropped[slot]}")
        wait = time.monotonic() - t0
        res = self.round(t, state, updates)
        for slot, why in res.dropped:
            self.echo(f"fedtune: round {t}: dropped update of slot {slot}: {why}")
        for note in res.notes:
            self.echo(f"fedtune: round {t}: {note}")
        stats = {
            "train-loss": res.train_loss,
            "bytes-up": self._total_up() - up0,
            "bytes-down": down * len(picks),
            "valid-replies": len(res.applied),
            "dropped-replies": len(dropped) + len(res.dropped),
            "skipped": res.skipped,
            "wait-seconds": wait,
        }
        return res, stats

    def run(self) -> Tensors:
        state, first = self.folder.start(self.round, self.wb.initial)
        if first == 1:
            self.folder.evaluate(0, state, {}, self.round.residual)
        for t in range(first, self.cfg.num_rounds + 1):
            res, stats = self.step(t, state)
            self.history.append(res)
            state = res.state
            self.folder.evaluate(t, state, stats, self.round.residual)
            self.folder.save(t, state, self.round)
        totals = {s: (u, d) for s, (u, d) in self.slot_bytes.items()}
        self.folder.finish(state, totals, self.round.residual)
        return state

    def _count(self, slot: int, up: int = 0, down: int = 0) -> None:
        b = self.slot_bytes.setdefault(slot, [0, 0])
        b[0] += up
        b[1] += down

    def _total_up(self) -> int:
        return sum(u for u, _ in self.slot_bytes.values())


def _state_bytes(state: Tensors) -> int:
    from fedtune.fl.records import state_bytes  # Flower's own accounting of a record

    return state_bytes(state)


def _payload_bytes(payload: bytes) -> int:
    from fedtune.fl.records import payload_bytes

    return payload_bytes(payload)


def build_config(items: list[str], app: str | Path = ROOT) -> Config:
    """Defaults + overrides, with the node counts ``fedtune.launch`` would set."""
    from fedtune.launch import node_overrides, parse_overrides

    overrides = parse_overrides(items)
    merged = {**defaults_from_pyproject(Path(app) / "pyproject.toml"), **overrides}
    cfg = parts.load_config(merged, app_dir=app)
    n = len(pipeline.federation(cfg).clients)
    merged.update(node_overrides(overrides, cfg, n))
    return parts.load_config(merged, app_dir=app)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedtune.simulate", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--run-config", "-c", action="append", default=[], help="key=value pairs or a TOML file"
    )
    ap.add_argument("--app", default=str(ROOT), help="the app folder (plug-in paths start here)")
    ap.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show library warnings and load reports (default: runs/<run>/log.txt only); "
        "also FEDTUNE_VERBOSE=1",
    )
    args = ap.parse_args(argv)
    from fedtune import report

    verbose = args.verbose or report.verbose_from_env()
    # loading the model and data warns before the run folder exists: log to a temporary
    # file first, then move it into the folder
    fd, tmp_log = tempfile.mkstemp(prefix="fedtune-simulate-", suffix=".log")
    os.close(fd)
    report.route_library_output(Path(tmp_log), verbose)
    if not verbose:
        report.quiet_progress_bars()
    try:
        cfg = build_config(args.run_config, args.app)
        sim = Simulation(cfg)
    except (ConfigError, ValueError, OSError) as e:
        report.close_log()
        Path(tmp_log).unlink(missing_ok=True)
        print(f"fedtune: error: {e}", file=sys.stderr)
        return 2
    report.move_log(sim.folder.path / report.LOG_NAME)
    try:
        sim.run()
    finally:
        report.close_log()
    print(report.final_lines(sim.folder.path))
    return 0

if __name__ == "__main__":
    sys.exit(main())
