"""fedtune ServerApp: config -> parts -> strategy -> rounds (checkpointed) -> saved adapter."""

from __future__ import annotations

import sys
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedtune import checkpoint, parts, pipeline
from fedtune.config import ConfigError
from fedtune.data import DataError
from fedtune.fl.loop import run_rounds
from fedtune.fl.records import record_to_state, state_to_record
from fedtune.fl.strategy import FedTuneStrategy, RoundStats
from fedtune.models import ModelError
from fedtune.run import RunFolder

app = ServerApp()
APP_DIR = Path(__file__).resolve().parents[1]  # the unpacked Flower app: plug-in paths start here


def _echo(line: str) -> None:
    log(INFO, "%s", line)


@app.main()
def main(grid: Grid, context: Context) -> None:
    pipeline.quiet_libraries()
    try:
        cfg = parts.load_config(dict(context.run_config), app_dir=APP_DIR)
        wb = pipeline.workbench(cfg, pipeline.federation(cfg))
        folder = RunFolder(cfg, _echo)
    except (ConfigError, DataError, ModelError, checkpoint.CheckpointError) as e:
        log(ERROR, "fedtune: %s", e)
        sys.exit(f"fedtune: {e}")

    server_round = pipeline.server_round(cfg)
    state, first_round = folder.start(server_round, wb.initial)
    pending: dict[int, RoundStats] = {}
    timings: dict[int, dict[str, float]] = {}  # run_rounds: how long each round waited for replies
    strategy = FedTuneStrategy(
        codec=pipeline.codec(cfg),
        server_round=server_round,
        spec=wb.initial,
        run_seed=cfg.seed,
        on_round=lambda s: pending.__setitem__(s.round, s),
        node_wait=cfg.round_timeout,
        downlink=cfg.downlink,
        # a fresh run starts from the keyed initial adapter, which clients build themselves too
        client_initial=first_round == 1,
        private=parts.private_run(cfg),  # dp sampling, SecAgg+ parameters
        identify_nodes=cfg.identify_nodes,
        fraction_train=cfg.fraction_train,
        min_train_nodes=cfg.min_train_nodes,
        min_available_nodes=cfg.min_available_nodes,
    )

    def evaluate(t: int, arrays: ArrayRecord) -> MetricRecord:
        s = pending.pop(t, RoundStats(t))
        stats = {
            "train-loss": s.train_loss,
            "bytes-up": s.bytes_up,
            "bytes-down": s.bytes_down,
            "valid-replies": s.valid,
            "dropped-replies": len(s.dropped),
            "skipped": s.skipped,
            **s.privacy,  # dp-epsilon, dp-clip-norm, ... (metrics.jsonl)
            **timings.pop(t, {}),
        }
        row = folder.evaluate(t, record_to_state(arrays), stats, server_round.residual)
        return MetricRecord({k: float(v) for k, v in row.items() if isinstance(v, int | float)})

    final = run_rounds(
        strategy,
        grid,
        state_to_record(state),
        first_round=first_round,
        num_rounds=cfg.num_rounds,
        timeout=cfg.round_timeout,
        evaluate_fn=evaluate,
        after_round=lambda t, arrays: folder.save(t, record_to_state(arrays), server_round),
        timings=timings,
    )
    folder.finish(record_to_state(final), strategy.byte_totals(), server_round.residual)
