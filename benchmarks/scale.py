"""Many virtual clients on one machine (issue 18, item 5): memory and server time per round.

    python benchmarks/scale.py [--clients 100 1000] [--rounds 3] [--run-config ...]

For each client count N, one ``fedtune.launch`` run with ``partitioning='dirichlet'
num-partitions=N fraction-train=0.05`` (N SuperNodes, 5 % of them sampled a round) and
reports the peak memory of the whole process tree (launcher, SuperLink, simulation process,
Ray, its actors; PSS and RSS sums, :class:`overhead.PeakMemory`) and the server's time per
round: the round's ``seconds`` minus ``wait-seconds`` (the time ``grid.send_and_receive``
waited for the sampled clients), i.e. sampling, messages out, decoding, merging,
evaluation and checkpointing. Extra ``--run-config`` items (e.g. ``local-steps=2``) apply to
every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--run-config", "-c", action="append", default=[])
    ap.add_argument("--out", default="/tmp/fedtune-scale")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    results = []
    for n in args.clients:
        items = [
            f"partitioning='dirichlet' num-partitions={n} fraction-train={args.fraction} "
            f"num-rounds={args.rounds}",
            *args.run_config,
        ]
        name = f"scale-{n}-{time.strftime('%H%M%S')}"
        r = run("launch", items, name, Path(args.out), timeout=6 * 3600)
        rows = [
            json.loads(x)
            for x in (Path(args.out) / name / "metrics.jsonl").read_text().splitlines()
        ]
        server = [r_["seconds"] - r_.get("wait-seconds", 0.0) for r_ in rows if r_["round"] > 0]
        r.update(
            {
                "clients": n,
                "sampled": rows[1]["valid-replies"] + rows[1]["dropped-replies"],
                "server-s": server,
                "wait-per-round-s": [r_.get("wait-seconds") for r_ in rows if r_["round"] > 0],
            }
        )
        results.append(r)
        print(
            f"{n:5d} clients ({r['sampled']} a round): rc {r['rc']} | wall {r['wall-s']:.0f} s, "
            f"start-up {r['startup-s']:.0f} s | server time per round "
            + ", ".join(f"{s:.1f}" for s in server)
            + f" s | peak memory {r['peak-pss-gb']:.2f} GB PSS ({r['peak-rss-gb']:.2f} GB RSS, "
            f"{r['processes']} processes)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
