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
        self.private = parts.private_run(cfg)
        self.folder = RunFolder(cfg, echo)
        self.error_feedback: dict[int, codecs.ErrorFeedback] = {}  # per client, as Context.state
        self.slot_bytes: dict[int, list[int]] = {}
        self.history: list[rnd_.RoundResult] = []
        self._secure: list[tuple[int, torch.Tensor, dict[str, float]]] = []  # SecAgg's inputs

    def client(
        self, slot: int, state: Tensors, t: int, key: int, dp: Any = None
    ) -> rnd_.Update | torch.Tensor:
        """One client's round as the ClientApp runs it, then decoded as the strategy does.
        ``dp`` (a :class:`fedtune.privacy.ClientDP`): the client clips and noises itself; under
        SecAgg the result is the vector it puts into the secure sum."""
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
        if self.private.secagg:
            from fedtune.privacy.client import secure_vector

            c = self.private.clip_range(self.round.dp)
            v = secure_vector(self.codec, payload, self.wb.initial, dp, key=key, clip_range=c)
            # secaggplus_mod sends the masked vector as int64: 8 bytes a coordinate (its key
            # exchange adds ~10 KB a client-round: benchmarks/secagg_overhead.py)
            self._count(slot, up=8 * v.numel())
            self._secure.append((slot, v, m))
            return v
        if dp is not None:
            from fedtune.privacy.client import privatize_payload

            payload, extra = privatize_payload(
                self.codec, payload, self.wb.initial, dp, key=key, server_round=t, slot=slot
            )
            m = {**m, **extra}
        self._count(slot, up=_payload_bytes(payload))
        delta = rnd_.decode(self.codec, payload, self.wb.initial, key=key, server_round=t, slot=slot)
        return rnd_.Update(
            slot,
            delta,
            m["num-examples"],
            m.get("train-loss", math.nan),
            payload,
            clip_bit=m.get("dp-clip-bit", math.nan),
        )

    def _secure_sum(self, t: int, sampled: int) -> rnd_.SecureSum | None:
        """SecAgg's result in process: the quantized modular sum of fedtune.privacy.secure
        (the masks of the real protocol cancel exactly; fedtune.launch runs the protocol).
        None when fewer clients survived than the reconstruction threshold."""
        from fedtune.privacy import secure

        got, self._secure = self._secure, []
        need = self.private.survivors_needed(sampled)
        if len(got) < need:
            self.echo(
                f"fedtune: round {t}: SecAgg: {len(got)} of {sampled} clients survived, fewer "
                f"than the threshold {need}: the round fails, nothing applied"
            )
            return None
        dp, private = self.round.dp, self.private
        weights = [1.0 if dp is not None else float(m["num-examples"]) for _, _, m in got]
        keys = [rnd_.client_key(self.cfg.seed, t, slot) for slot, _, _ in got]
        c = private.clip_range(dp)
        mean = secure.secure_mean(
            [v for _, v, _ in got], weights, clip=c, max_weight=private.max_weight(dp), keys=keys
        )
        scale = 4.0 / c  # the clip bit travels as b * c / 4
        mean[-1] = mean[-1] * scale
        contributors = [
            (slot, w, float(m.get("train-loss", math.nan)))
            for (slot, _, m), w in zip(got, weights, strict=True)
        ]
        return rnd_.SecureSum(mean, float(sum(weights)), contributors, sampled)

    def step(self, t: int, state: Tensors) -> tuple[rnd_.RoundResult, dict[str, Any]]:
        """Round ``t``: sample, train every sampled client, run the server round."""
        n = len(self.fed.clients)
        picks = rnd_.sample(
            self.cfg.seed,
            t,
            n,
            self.cfg.fraction_train,
            self.cfg.min_train_nodes,
            poisson=self.private.poisson,
        )
        secagg = self.private.secagg
        dp = None
        if self.round.dp is not None:
            dp = self.round.dp.client_params(len(picks), client_side=self.private.client_side)
        down = _state_bytes(state) + (_state_bytes(self.round.residual) if self.round.residual else 0)
        t0 = time.monotonic()  # the clients' share of the round (they run one after another)
        updates, dropped, up0 = [], {}, self._total_up()
        for slot in picks:
            self._count(slot, down=down)
            try:
                got = self.client(slot, state, t, rnd_.client_key(self.cfg.seed, t, slot), dp)
                if isinstance(got, rnd_.Update):
                    updates.append(got)
            except (ValueError, KeyError, TypeError, faults.InjectedFault) as e:
                dropped[slot] = f"{type(e).__name__}: {e}"
                self.echo(f"fedtune: round {t}: dropped reply of slot {slot}: {dropped[slot]}")
        wait = time.monotonic() - t0
        if secagg:
            total = self._secure_sum(t, len(picks))
            if total is None:
                res = rnd_.RoundResult(t, dict(state), skipped=True)
                res.notes.append("SecAgg round failed: nothing applied")
            else:
                res = self.round(t, state, [], secure=total, sampled=len(picks))
        else:
            res = self.round(t, state, updates, sampled=len(picks))
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
            **res.privacy,
        }
        return res, stats

    def run(self) -> Tensors:
        state, first = self.folder.start(self.round, self.wb.initial)
        if first == 1:
            self.folder.evaluate(0, state, {}, self.round.residual)
        for t in range(first, self.cfg.num_rounds + 1):
            if self.round.budget_exhausted():
                self.echo(
                    f"fedtune: stopping before round {t}: it would spend more than "
                    f"dp-target-epsilon={self.cfg.dp_target_epsilon:g}"
                )
                break
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
