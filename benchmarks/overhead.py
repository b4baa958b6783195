"""Flower's overhead: the same rounds through ``fedtune.launch`` and ``fedtune.simulate``.

    python benchmarks/overhead.py [--run-config KV_OR_TOML ...] [--only launch|simulate]

Runs the same configuration (default: the demo's) through both entry points, one after the
other, each as its own process, and reports per entry point: wall time, start-up (wall time
minus the rounds' ``seconds`` in metrics.jsonl: imports, data, model, and for launch the
SuperLink, Ray and the first contact), the mean seconds of rounds 2.. (round 1 of a
``flwr run`` also starts the Ray actors, which load the model: reported on its own), and the
peak memory of the whole process tree (sum of RSS and of PSS, sampled every 0.5 s). Then the
ratios launch / simulate. Both produce the same global adapter (tests/test_parity.py), so the
difference is what Flower, Ray and the transport cost. On a machine that others use, run it
twice and trust the ratios more than the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Peak total memory of a process and all its descendants, sampled in a thread.

    ``rss`` sums resident set sizes (shared library pages counted in every process: an upper
    bound); ``pss`` divides shared pages among the processes that map them (what the run
    really occupies). Descendants that start their own sessions (Ray, the SuperLink) are
    still children by parent id, so they are counted."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.every = every
        self.rss = 0
        self.pss = 0
        self.procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            rss = pss = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                except psutil.Error:
                    continue
            if pss > self.pss:
                self.pss, self.rss_at_peak = pss, rss
            self.rss = max(self.rss, rss)
            self.procs = max(self.procs, len(procs))
            self._stop.wait(self.every)


def run(entry: str, items: list[str], run_name: str, out_dir: Path, timeout: float) -> dict[str, Any]:
    """One run of ``python -m fedtune.<entry>``: wall time, memory and its metrics rows."""
    cmd = [sys.executable, "-m", f"fedtune.{entry}"]
    for item in [*items, f"run-name='{run_name}' output-dir='{out_dir}'"]:
        cmd += ["-c", item]
    log = out_dir / f"{run_name}.stdout"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        with PeakMemory(proc.pid) as mem:
            rc = proc.wait(timeout=timeout)
    wall = time.monotonic() - t0
    metrics = out_dir / run_name / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise SystemExit(f"{entry} failed (exit code {rc}):\n" + "\n".join(tail))
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    rounds = [r for r in rows if r["round"] > 0]
    later = [r["seconds"] for r in rounds[1:]] or [rounds[0]["seconds"]]
    return {
        "entry": entry,
        "rc": rc,
        "wall-s": wall,
        "startup-s": wall - sum(r["seconds"] for r in rounds),
        "round1-s": rounds[0]["seconds"],
        "round-s": sum(later) / len(later),
        "wait-s": sum(r.get("wait-seconds", 0.0) for r in rounds[1:]) / max(1, len(rounds) - 1),
        "eval-s": sum(r["eval-seconds"] for r in rounds) / len(rounds),
        "peak-pss-gb": mem.pss / 1e9,
        "peak-rss-gb": mem.rss / 1e9,
        "processes": mem.procs,
        "final-accuracy": rows[-1].get("test-accuracy"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-config", "-c", action="append", default=[])
    ap.add_argument("--only", choices=("launch", "simulate"), default=None)
    ap.add_argument("--out", default="/tmp/fedtune-overhead")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    tag = time.strftime("%H%M%S") + f"-{os.getpid()}"
    res = {}
    for entry in ("simulate", "launch"):
        if args.only in (None, entry):
            res[entry] = run(entry, args.run_config, f"{entry}-{tag}", Path(args.out), args.timeout)
            r = res[entry]
            print(
                f"{entry:8s}: rc {r['rc']} wall {r['wall-s']:6.1f} s | start-up {r['startup-s']:6.1f} s"
                f" | round 1 {r['round1-s']:6.1f} s | later rounds {r['round-s']:6.1f} s"
                f" (waiting for clients {r['wait-s']:.1f} s, eval {r['eval-s']:.1f} s)"
                f" | peak memory {r['peak-pss-gb']:.2f} GB PSS ({r['peak-rss-gb']:.2f} GB RSS,"
                f" {r['processes']} processes) | accuracy {r['final-accuracy']}",
                flush=True,
            )
    if len(res) == 2:
        a, b = res["launch"], res["simulate"]
        print(
            f"launch / simulate: later rounds {a['round-s'] / b['round-s']:.2f}x, "
            f"round 1 {a['round1-s'] / b['round1-s']:.2f}x, start-up {a['startup-s'] / b['startup-s']:.2f}x, "
            f"wall {a['wall-s'] / b['wall-s']:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
