"""Run several configurations on the same clients and compare them side by side.

    python simulations/compare.py simulations/a_lora_dense_fedavg.toml simulations/d_mos_srht_ties.toml \
        [--common "num-rounds=10"] [--per "d_mos_srht_ties:num-rounds=20"] [--target 0.62] [--name default]

Every configuration is one real ``flwr run`` (through :mod:`fedtune.launch`) with the same
seed, data and partitions; ``--in-process`` runs each through :mod:`fedtune.simulate` instead
(no Ray, no SuperLink: the same rounds, faster to start; see docs/architecture.md). The report (a markdown table and two plots: held-out accuracy
against round and against cumulative uplink bytes) goes to ``docs/benchmarks.md`` (section
``compare-<name>``) and ``docs/img/``.

Columns: final and best held-out accuracy, rounds, uplink bytes per client-round, total
uplink bytes, uplink bytes until the target accuracy is first reached (the target defaults
to the first configuration's final accuracy minus 1 point), and wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import write_section  # noqa: E402
from fedtune.launch import main as launch  # noqa: E402
from fedtune.launch import parse_overrides  # noqa: E402
from fedtune.simulate import main as simulate  # noqa: E402


def _kv(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in d.items())


def run_one(
    name: str,
    overrides: dict[str, Any],
    out_dir: Path,
    flwr_home: str | None,
    in_process: bool = False,
) -> dict[str, Any]:
    """One configuration end to end; returns its metrics rows and wall time."""
    cfg = {**overrides, "output-dir": str(out_dir), "run-name": name}
    t0 = time.perf_counter()
    if in_process:
        rc = simulate(["-c", _kv(cfg)])
    else:
        rc = launch(["-c", _kv(cfg)] + (["--flwr-home", flwr_home] if flwr_home else []))
    wall = time.perf_counter() - t0
    metrics = out_dir / name / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        raise RuntimeError(f"configuration {name!r} failed (exit code {rc})")
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return {"name": name, "rows": rows, "wall": wall, "dir": out_dir / name}


def trainable_parameters(run_dir: Path) -> int | None:
    """Number of values the run trains (and a dense codec sends): from its saved config."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        return None
    from fedtune import pipeline
    from fedtune.config import parse

    cfg = parse(json.loads(cfg_path.read_text()))
    state = pipeline.workbench(cfg, pipeline.federation(cfg)).initial
    return sum(t.numel() for t in state.values())


def summarize(res: dict[str, Any], target: float | None) -> dict[str, Any]:
    rows = res["rows"]
    trained = [r for r in rows if r["round"] > 0]
    metric = "test-accuracy" if "test-accuracy" in rows[-1] else "test-loss"
    up_total = sum(r.get("bytes-up", 0) for r in trained)
    client_rounds = sum(r.get("valid-replies", 0) for r in trained)
    cum, to_target = 0, None
    for r in trained:
        cum += r.get("bytes-up", 0)
        v = r.get(metric)
        if target is not None and v is not None and to_target is None:
            reached = v >= target if metric == "test-accuracy" else v <= target
            if reached:
                to_target = cum
    vals = [r.get(metric) for r in rows if r.get(metric) is not None]
    return {
        "name": res["name"],
        "metric": metric,
        "final": rows[-1].get(metric),
        "best": (max(vals) if metric == "test-accuracy" else min(vals)) if vals else None,
        "rounds": len(trained),
        "per_client_round": up_total / client_rounds if client_rounds else 0.0,
        "up_total": up_total,
        "to_target": to_target,
        "wall": res["wall"],
        "trainable": trainable_parameters(res["dir"]) if "dir" in res else None,
    }


def markdown(summaries: list[dict[str, Any]], target: float | None, title: str, img: str) -> str:
    metric = summaries[0]["metric"].replace("test-", "held-out ")
    base = summaries[0]
    lines = [
        f"### {title}",
        "",
        f"Measured {time.strftime('%Y-%m-%d')}; target {metric} = "
        + (f"{target:.4f}" if target is not None else "n/a")
        + f"; ratios are against `{base['name']}`.",
        "",
        f"| config | trainable params | final {metric} | best | rounds | uplink B / client-round | total uplink B | uplink ratio | uplink B to target | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        ratio = base["up_total"] / s["up_total"] if s["up_total"] else float("inf")
        lines.append(
            f"| {s['name']} | "
            + (f"{s['trainable']:,}" if s["trainable"] is not None else "-")
            + f" | {s['final']:.4f} | {s['best']:.4f} | {s['rounds']} | {s['per_client_round']:,.0f} | "
            f"{s['up_total']:,} | {ratio:,.1f}x fewer | "
            + (f"{s['to_target']:,}" if s["to_target"] is not None else "not reached")
            + (f" | {s['wall']:.0f} |" if s["wall"] == s["wall"] else " | - |")
        )
    lines += ["", f"![held-out metric vs round and vs cumulative uplink bytes]({img})"]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for res in results:
        rows = res["rows"]
        metric = "test-accuracy" if "test-accuracy" in rows[-1] else "test-loss"
        xs = [r["round"] for r in rows]
        ys = [r.get(metric) for r in rows]
        cum, cums = 0, []
        for r in rows:
            cum += r.get("bytes-up", 0)
            cums.append(max(cum, 1))
        ax1.plot(xs, ys, marker="o", label=res["name"])
        ax2.plot(cums, ys, marker="o", label=res["name"])
    ax1.set_xlabel("round")
    ax2.set_xlabel("cumulative uplink bytes (all clients)")
    ax2.set_xscale("log")
    for ax in (ax1, ax2):
        ax.set_ylabel(metric.replace("test-", "held-out "))
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", help="override TOML files (first one is the baseline)")
    ap.add_argument("--common", action="append", default=[], help="overrides for every config")
    ap.add_argument(
        "--per", action="append", default=[], help="NAME:key=value overrides for one config"
    )
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--name", default="default", help="report section name")
    ap.add_argument("--out", default=str(ROOT / "simulations" / "out"))
    ap.add_argument("--flwr-home", default=None)
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run each configuration with fedtune.simulate (no Ray or SuperLink) instead of flwr run",
    )
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    ap.add_argument(
        "--reuse",
        action="append",
        default=[],
        help="NAME=RUN_DIR: take this configuration's results from a finished run folder "
        "(same seed and data) instead of running it again",
    )
    args = ap.parse_args(argv)

    common = parse_overrides(args.common)
    per: dict[str, dict[str, Any]] = {}
    for item in args.per:
        name, _, kv = item.partition(":")
        per.setdefault(name, {}).update(parse_overrides([kv]))
    out_dir = Path(args.out) / time.strftime("compare-%Y%m%d-%H%M%S")
    reuse = dict(item.split("=", 1) for item in args.reuse)
    results = []
    for path in args.configs:
        name = Path(path).stem
        if name in reuse:
            rows_path = Path(reuse[name]) / "metrics.jsonl"
            rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()]
            wall = (
                json.loads((Path(reuse[name]) / "wall.json").read_text())["wall"]
                if (Path(reuse[name]) / "wall.json").exists()
                else float("nan")
            )
            print(f"compare: reusing {name} from {rows_path}", flush=True)
            results.append({"name": name, "rows": rows, "wall": wall, "dir": Path(reuse[name])})
            continue
        overrides = {**parse_overrides([path]), **common, **per.get(name, {})}
        print(f"compare: running {name} with {overrides}", flush=True)
        results.append(run_one(name, overrides, out_dir, args.flwr_home, args.in_process))
    first = summarize(results[0], None)
    target = args.target
    if target is None and first["metric"] == "test-accuracy":
        target = first["final"] - 0.01
    summaries = [summarize(r, target) for r in results]
    img_rel = f"img/compare-{args.name}.png"
    md = markdown(summaries, target, f"End-to-end comparison: {args.name}", img_rel)
    print(md)
    out_dir.mkdir(parents=True, exist_ok=True)  # every configuration may have been reused
    (out_dir / "report.md").write_text(md + "\n")
    plot(results, out_dir / "compare.png")
    if not args.no_write:
        plot(results, ROOT / "docs" / img_rel)
        write_section(f"compare-{args.name}", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
