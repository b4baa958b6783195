"""fedtune ServerApp: config -> federation -> strategy -> rounds (checkpointed) -> saved adapter."""

from __future__ import annotations

import json
import sys
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedtune import adapters, checkpoint, merging, pipeline
from fedtune.adapters import exact
from fedtune.config import Config, ConfigError, parse
from fedtune.data import DataError
from fedtune.fl.records import record_to_state, state_to_record
from fedtune.fl.strategy import FedTuneStrategy, RoundStats
from fedtune.metrics import MetricsLog, create_run_dir, round_line, summary_table
from fedtune.models import ModelError

app = ServerApp()


def _fail(e: Exception) -> None:
    log(ERROR, "fedtune: %s", e)
    sys.exit(f"fedtune: {e}")


def _strategy(
    cfg: Config,
    spec: dict,  # type: ignore[type-arg]
    on_round,
    exact_state: exact.ExactResidual | None = None,
) -> FedTuneStrategy:
    return FedTuneStrategy(
        exact=exact_state,
        downlink=cfg.downlink,
        codec=pipeline.build_codec(cfg, salt=pipeline.layout_salt(cfg)),
        merger=merging.get(cfg.merger, **dict(cfg.merger_options)),
        server_opt=merging.get_server_opt(cfg.server_opt, **dict(cfg.server_opt_options)),
        spec=spec,
        run_seed=cfg.seed,
        min_valid=cfg.min_train_nodes,
        clip=(
            merging.NormClip(
                cfg.clip_norm, relative=cfg.clip_mode == "median", reject=cfg.clip_reject
            )
            if cfg.clip_norm > 0
            else None
        ),
        direction_filter=(
            merging.CosineFilter(
                cfg.robust_filter_threshold, memory=cfg.robust_filter == "cosine-history"
            )
            if cfg.robust_filter != "none"
            else None
        ),
        on_round=on_round,
        node_wait=cfg.round_timeout,
        fraction_train=cfg.fraction_train,
        min_train_nodes=cfg.min_train_nodes,
        min_available_nodes=cfg.min_available_nodes,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    pipeline.quiet_libraries()
    try:
        cfg = parse(context.run_config)
        fed = pipeline.federation(cfg)
        wb = pipeline.workbench(cfg, fed)
        ck = None
        if cfg.resume:
            run_dir = Path(cfg.resume)
            ck = checkpoint.load(run_dir)
            checkpoint.check_compatible(ck.config, cfg.to_flat())
        else:
            run_dir = create_run_dir(cfg.output_dir, cfg.run_name)
    except (ConfigError, DataError, ModelError, checkpoint.CheckpointError) as e:
        _fail(e)
        return

    (run_dir / "config.json").write_text(json.dumps(cfg.to_flat(), indent=2))
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    pending: dict[int, RoundStats] = {}
    # factor-mode='exact' (FedEx-LoRA): the server keeps the running base-weight residual
    ex = exact.ExactResidual(exact.exact_layers(wb.model)) if cfg.factor_mode == "exact" else None
    strategy = _strategy(cfg, wb.initial, lambda s: pending.__setitem__(s.round, s), ex)
    # a fresh run starts from the keyed initial adapter, which clients build themselves too
    strategy.downlink.client_initial = ck is None

    def residual() -> dict | None:  # type: ignore[type-arg]
        return ex.residual if ex is not None else None

    state, first_round = wb.initial, 1
    if ck is not None:
        state, first_round = ck.adapter, ck.round + 1
        strategy.server_opt.load_state_dict(ck.server_opt)
        if strategy.direction_filter is not None:  # cosine-history: the clients' past scores
            strategy.direction_filter.load_state_dict(ck.extra.get("direction-filter", {}))
        if ex is not None:
            ex.load_state_dict(ck.residual)
        metrics.truncate_after(ck.round)  # rows evaluated after the checkpoint are redone
        log(INFO, "fedtune: resuming %s after round %d", run_dir, ck.round)
    log(
        INFO,
        "fedtune: run folder %s; %d clients: %s",
        run_dir,
        len(fed.clients),
        ", ".join(fed.client_names),
    )
    n_params = sum(t.numel() for t in wb.initial.values())
    log(INFO, "fedtune: %s adapter: %d trainable parameters", cfg.adapter, n_params)
    log(
        INFO,
        "fedtune: majority-class baseline on the held-out split: %.4f",
        pipeline.majority_baseline(fed),
    )

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        res = pipeline.evaluate_state(cfg, record_to_state(arrays), residual=residual())
        s = pending.pop(server_round, RoundStats(server_round))
        row = {
            "round": server_round,
            "train-loss": s.train_loss,
            **{f"test-{k}": v for k, v in res.items() if k != "num-examples"},
            "bytes-up": s.bytes_up,
            "bytes-down": s.bytes_down,
            "valid-replies": s.valid,
            "dropped-replies": len(s.dropped),
            "skipped": s.skipped,
        }
        metrics.append(row)
        log(INFO, "fedtune: %s", round_line(row))
        if cfg.task == "causal-lm":  # a few greedy answers per round, to read progress
            samples = pipeline.generate(cfg, record_to_state(arrays), n=3, residual=residual())
            with (run_dir / "generations.jsonl").open("a") as f:
                for prompt, answer in samples:
                    f.write(
                        json.dumps({"round": server_round, "prompt": prompt, "answer": answer})
                        + "\n"
                    )
        return MetricRecord({k: float(v) for k, v in row.items() if isinstance(v, int | float)})

    def save(server_round: int, arrays: ArrayRecord) -> None:
        checkpoint.save(
            run_dir,
            checkpoint.Checkpoint(
                round=server_round,
                seed=cfg.seed,
                config=cfg.to_flat(),
                adapter=record_to_state(arrays),
                server_opt=strategy.server_opt.state_dict(),
                extra=(
                    {"direction-filter": strategy.direction_filter.state_dict()}
                    if strategy.direction_filter is not None
                    else {}
                ),
                residual=dict(residual() or {}),
            ),
        )

    final = strategy.run(
        grid,
        state_to_record(state),
        first_round=first_round,
        num_rounds=cfg.num_rounds,
        timeout=cfg.round_timeout,
        evaluate_fn=evaluate,
        after_round=save,
    )
    adapters.load_trainable_state(wb.model, record_to_state(final))
    wb.adapter.export_peft(wb.model, run_dir / "adapter")
    log(INFO, "fedtune: final adapter (PEFT format) saved to %s", run_dir / "adapter")
    totals = {
        str(slot): {"bytes-up": up, "bytes-down": down}
        for slot, (up, down) in strategy.byte_totals().items()
    }
    (run_dir / "bytes-per-client.json").write_text(json.dumps(totals, indent=2))
    if ex is not None:  # the adapter alone is not the model: base + residual + adapter is
        path = exact.save_residual(run_dir / "adapter", ex.residual)
        log(INFO, "fedtune: exact mode: add %s to the base weights before loading it", path)
    log(INFO, "\n%s", summary_table(metrics.rows()))
