"""A run's folder, shared by the ServerApp and the in-process simulator.

``runs/<run>/`` holds ``config.json``, ``metrics.jsonl`` (one row per round, round 0 = the
initial adapter), ``checkpoint/`` (the whole server state after the last round, so a run
resumes bit-identically), ``generations.jsonl`` (causal LM), and at the end the PEFT
``adapter/``, ``bytes-per-client.json`` and ``curves.png`` (:mod:`fedtune.report`); ``log.txt``
holds what libraries printed. Each metrics row has the round's wall ``seconds``. Both entry
points write the same files through this class; neither knows the other. Nothing here
imports Flower.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedtune import adapters, checkpoint, pipeline, report
from fedtune.config import Config
from fedtune.metrics import MetricsLog, create_run_dir, round_line
from fedtune.round import ServerRound

Tensors = dict[str, torch.Tensor]


class RunFolder:
    """Create (or, with ``resume``, reopen) the run folder and keep its files up to date.

    ``echo`` prints a line where the entry point prints (Flower's log, or stdout).
    """

    def __init__(self, cfg: Config, echo: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.echo = echo
        self.ck: checkpoint.Checkpoint | None = None
        if cfg.resume:
            self.path = Path(cfg.resume)
            self.ck = checkpoint.load(self.path)
            checkpoint.check_compatible(self.ck.config, cfg.to_flat())
        else:
            self.path = create_run_dir(cfg.output_dir, cfg.run_name)
        (self.path / "config.json").write_text(json.dumps(cfg.to_flat(), indent=2))
        self.metrics = MetricsLog(self.path / "metrics.jsonl")
        self._mark = time.monotonic()  # end of the previous row: a round's seconds start here

    def start(self, server_round: ServerRound, initial: Tensors) -> tuple[Tensors, int]:
        """(state, first round): the initial adapter, or the checkpoint's state with the round's
        optimizer, filter memory and residual restored."""
        if self.ck is None:
            state, first = dict(initial), 1
        else:
            state, first = self.ck.adapter, self.ck.round + 1
            server_round.load_state_dict(
                {
                    "server_opt": self.ck.server_opt,
                    "extra": self.ck.extra,
                    "residual": self.ck.residual,
                }
            )
            self.metrics.truncate_after(self.ck.round)  # rows after the checkpoint are redone
            self.echo(f"fedtune: resuming {self.path} after round {self.ck.round}")
        fed = pipeline.federation(self.cfg)
        n_params = sum(t.numel() for t in initial.values())
        for line in report.header_lines(
            self.cfg, fed.client_names, n_params, pipeline.majority_baseline(fed), self.path
        ):
            self.echo(line)
        self._mark = time.monotonic()  # round 0's seconds: the initial evaluation only
        return state, first

    def evaluate(
        self,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        stats: Mapping[str, Any],
        residual: Tensors | None = None,
    ) -> dict[str, Any]:
        """Held-out metrics of ``state``, appended with the round's ``stats`` as one row.

        ``seconds`` is the round's wall time: from the end of the previous row (or of
        :meth:`start`) to now, so it covers sampling, client training, transport,
        aggregation, checkpointing and this evaluation; ``eval-seconds`` is the evaluation
        alone and ``wait-seconds`` (from ``stats``, when the entry point measures it) the time
        spent waiting for the clients' replies.
        """
        t_eval = time.monotonic()
        res = pipeline.evaluate_state(self.cfg, dict(state), residual=residual)
        now = time.monotonic()
        row = {
            "round": server_round,
            "train-loss": stats.get("train-loss", math.nan),
            **{f"test-{k}": v for k, v in res.items() if k != "num-examples"},
            "bytes-up": stats.get("bytes-up", 0),
            "bytes-down": stats.get("bytes-down", 0),
            "valid-replies": stats.get("valid-replies", 0),
            "dropped-replies": stats.get("dropped-replies", 0),
            "skipped": stats.get("skipped", False),
            # privacy spent and the mechanism's parameters (dp-epsilon, dp-clip-norm, ...)
            **{k: v for k, v in stats.items() if k.startswith(("dp-", "secagg-"))},
            "seconds": round(now - self._mark, 3),
            "eval-seconds": round(now - t_eval, 3),
        }
        if "wait-seconds" in stats:
            row["wait-seconds"] = round(float(stats["wait-seconds"]), 3)
        self.metrics.append(row)
        self.echo(f"fedtune: {round_line(row)}")
        if self.cfg.task == "causal-lm":  # a few greedy answers per round, to read progress
            samples = pipeline.generate(self.cfg, dict(state), n=3, residual=residual)
            with (self.path / "generations.jsonl").open("a") as f:
                for prompt, answer in samples:
                    line = {"round": server_round, "prompt": prompt, "answer": answer}
                    f.write(json.dumps(line) + "\n")
        self._mark = time.monotonic()
        return row

    def save(self, server_round: int, state: Mapping[str, torch.Tensor], sr: ServerRound) -> None:
        """Checkpoint the whole server state after ``server_round`` (atomic)."""
        sd = sr.state_dict()
        checkpoint.save(
            self.path,
            checkpoint.Checkpoint(
                round=server_round,
                seed=self.cfg.seed,
                config=self.cfg.to_flat(),
                adapter=dict(state),
                server_opt=sd["server_opt"],
                extra=sd["extra"],
                residual=sd["residual"],
            ),
        )

    def finish(
        self,
        state: Mapping[str, torch.Tensor],
        byte_totals: Mapping[int, tuple[int, int]],
        residual: Tensors | None = None,
    ) -> None:
        """Export the PEFT adapter, the per-client byte totals and ``curves.png``.

        The summary table is not echoed here: the entry point prints it once, with the paths
        (:func:`fedtune.report.final_lines`), where the user reads it."""
        wb = pipeline.workbench(self.cfg, pipeline.federation(self.cfg))
        adapters.load_trainable_state(wb.model, dict(state))
        wb.adapter.export_peft(wb.model, self.path / "adapter")
        totals = {
            str(slot): {"bytes-up": up, "bytes-down": down}
            for slot, (up, down) in sorted(byte_totals.items())
        }
        (self.path / "bytes-per-client.json").write_text(json.dumps(totals, indent=2))
        if residual is not None:  # the adapter alone is not the model: base + residual is
            from fedtune.adapters import exact

            path = exact.save_residual(self.path / "adapter", residual)
            self.echo(f"fedtune: exact mode: add {path} to the base weights before loading it")
        report.plot_curves(
            self.metrics.rows(),
            self.path / report.PLOT_NAME,
            title=f"{self.cfg.model} + {self.cfg.adapter}, codec {self.cfg.codec}, "
            f"merger {self.cfg.merger} ({self.path.name})",
        )
