"""Streaming TIES (fedtune) vs PEFT's stacked ``ties``: time and peak extra memory.

Run: ``python benchmarks/merging.py`` (all configs, writes the "merging" section of
docs/benchmarks.md) or ``python benchmarks/merging.py --quick`` (d = 1e5 and 1e6 only).

Every (implementation, n, d) runs in a fresh subprocess:

1. build n client deltas shaped like a LoRA adapter (pairs of 8×4096 and 4096×8 fp32
   tensors, plus one remainder tensor, d values in all) — the same inputs for every
   implementation;
2. warm up the implementation on a tiny input, ``gc.collect()``;
3. read the resident set size (``VmRSS``) as the baseline, reset the peak RSS counter
   (``echo 5 > /proc/self/clear_refs``), run the merge once and read the peak (``VmHWM``).

"peak extra" = ``VmHWM − baseline``: everything the merge allocates on top of the inputs,
including its d-float result. Implementations (equal weights, density 0.2):

* ``fedtune ties`` — ``merging.aggregate(get("ties", density=0.2), ...)``: streaming
  ``add``/``finish``, exact top-k over the whole adapter, 4 state vectors;
* ``fedtune ties scope=tensor`` — the same with per-tensor top-k (PEFT's trim scope);
* ``peft ties per-tensor`` — ``peft.utils.merge_utils.ties`` called per tensor name on the
  list of n client tensors (how PEFT applies it): stacks n × one tensor at a time;
* ``peft ties flat`` — the same function on each client's flattened adapter (whole-adapter
  top-k, the paper's and fedtune's trim scope): stacks n × d.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ["fedtune ties", "fedtune ties scope=tensor", "peft ties per-tensor", "peft ties flat"]
FULL = [(10, 1_000_000), (50, 1_000_000), (10, 10_000_000), (50, 10_000_000)]
QUICK = [(10, 100_000), (50, 100_000), (10, 1_000_000), (50, 1_000_000)]
DENSITY = 0.2


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _shapes(d: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    left = d
    while left >= 2 * 32768:
        shapes += [(8, 4096), (4096, 8)]
        left -= 2 * 32768
    if left:
        shapes.append((left,))
    return shapes


def _run(impl: str, deltas, weights):  # type: ignore[no-untyped-def]
    import torch
    from peft.utils import merge_utils

    from fedtune import merging

    if impl == "fedtune ties":
        return merging.aggregate(merging.get("ties", density=DENSITY), deltas, weights)
    if impl == "fedtune ties scope=tensor":
        m = merging.get("ties", density=DENSITY, scope="tensor")
        return merging.aggregate(m, deltas, weights)
    w = torch.tensor(weights)
    if impl == "peft ties per-tensor":
        return {k: merge_utils.ties([x[k] for x in deltas], w, density=DENSITY) for k in deltas[0]}
    if impl == "peft ties flat":
        flats = [torch.cat([t.reshape(-1) for t in x.values()]) for x in deltas]
        return {"flat": merge_utils.ties(flats, w, density=DENSITY)}
    raise ValueError(impl)


def worker(impl: str, n: int, d: int) -> dict[str, float]:
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = _shapes(d)
    deltas = [
        {
            f"layer{i}.{'A' if len(s) == 2 and s[0] == 8 else 'B'}": torch.randn(*s, generator=g)
            for i, s in enumerate(shapes)
        }
        for _ in range(n)
    ]
    weights = [1.0] * n
    tiny = [
        {"a": torch.randn(64, 64, generator=g), "b": torch.randn(100, generator=g)}
        for _ in range(3)
    ]
    _run(impl, tiny, [1.0] * 3)
    del tiny
    gc.collect()
    base_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    out = _run(impl, deltas, weights)
    dt = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    assert sum(t.numel() for t in out.values()) == d
    return {"time_s": dt, "extra_mb": (peak_kb - base_kb) / 1024, "base_mb": base_kb / 1024}


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small d only (1e5, 1e6)")
    ap.add_argument(
        "--no-write", action="store_true", help="print, do not update docs/benchmarks.md"
    )
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch threads in each worker (default 1: on a shared machine parallel regions "
        "make timings of both sides erratic)",
    )  # fmt: skip
    ap.add_argument("--repeat", type=int, default=2, help="fresh runs per row; best time")
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "N", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        impl, n, d = args.worker[0], int(args.worker[1]), int(args.worker[2])
        print(json.dumps(worker(impl, n, d)))
        return
    import torch

    configs = QUICK if args.quick else FULL
    rows: list[tuple[int, int, str, dict[str, float] | None, str]] = []
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for n, d in configs:
        for impl in IMPLS:
            need_mb = n * d * 4 * (6 if impl == "peft ties flat" else 1.2) / 2**20
            if need_mb > 0.8 * _mem_available_mb():
                rows.append((n, d, impl, None, f"skipped: needs ~{need_mb:.0f} MB"))
                print(f"n={n} d={d:.0e} {impl}: skipped (memory)", flush=True)
                continue
            cmd = [
                *(sys.executable, __file__, "--threads", str(args.threads)),
                *("--worker", impl, str(n), str(d)),
            ]
            # Best of `repeat` fresh runs (timing noise on a shared machine is one-sided);
            # the n·d-stacking PEFT runs at the largest size run once (minutes, ~10 GB).
            reps = 1 if impl == "peft ties flat" and n * d >= 10**8 else args.repeat
            runs, err = [], ""
            for _ in range(reps):
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if res.returncode != 0:
                    err = f"failed: {res.stderr.strip().splitlines()[-1:]}"
                    print(res.stderr, file=sys.stderr)
                    break
                runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
            if err or not runs:
                rows.append((n, d, impl, None, err))
                continue
            best: dict[str, float] = {
                "time_s": min(x["time_s"] for x in runs),
                "extra_mb": max(x["extra_mb"] for x in runs),
            }
            rows.append((n, d, impl, best, ""))
            print(
                f"n={n} d={d:.0e} {impl}: {best['time_s']:.2f} s (best of {len(runs)}), "
                f"+{best['extra_mb']:.0f} MB",
                flush=True,
            )

    def ref(impl: str) -> dict[tuple[int, int], dict[str, float]]:
        return {(n, d): r for n, d, i, r, _ in rows if i == impl and r}

    per_tensor, flat = ref("peft ties per-tensor"), ref("peft ties flat")
    lines = [
        "## Merging: streaming TIES vs PEFT `ties`",
        "",
        f"`python benchmarks/merging.py{' --quick' if args.quick else ''}` — CPU, torch "
        f"{torch.__version__}, {args.threads} torch thread(s) per run, {os.cpu_count()} cores shared "
        f"with other jobs (load average {os.getloadavg()[0]:.1f} at the end), density {DENSITY}, "
        "equal weights, LoRA-shaped deltas (8×4096 / 4096×8 fp32 tensors). Each row: best time of "
        f"{args.repeat} fresh subprocesses (1 for PEFT flat at n·d ≥ 1e8). *peak extra* = peak RSS "
        "(`VmHWM`, reset through `/proc/self/clear_refs`) minus the RSS once the inputs exist, so it "
        "includes the d-float result; *×d* = peak extra / (4·d bytes). *vs per-tensor* / *vs flat* "
        "= time / time of PEFT per-tensor / PEFT flat on the same (n, d). PEFT flat has the same "
        "whole-adapter top-k as `fedtune ties`; PEFT per-tensor the same as `scope=tensor`. "
        "Timings on this shared 2-core machine vary by ±30 % or more between runs.",
        "",
        "| n | d | implementation | time (s) | vs per-tensor | vs flat | peak extra (MB) "
        "| peak extra (×d floats) | inputs n·d (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, d, impl, row, note in rows:
        if row is None:
            lines.append(
                f"| {n} | {d:.0e} | {impl} | {note} | – | – | – | – | {n * d * 4 / 2**20:.0f} |"
            )
            continue
        ratios = [
            f"{row['time_s'] / b[(n, d)]['time_s']:.2f}" if (n, d) in b else "–"
            for b in (per_tensor, flat)
        ]
        lines.append(
            f"| {n} | {d:.0e} | {impl} | {row['time_s']:.2f} | {ratios[0]} | {ratios[1]} | "
            f"{row['extra_mb']:.0f} | {row['extra_mb'] * 2**20 / (4 * d):.1f} | "
            f"{n * d * 4 / 2**20:.0f} |"
        )
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from benchmarks._report import write_section

        write_section("merging", md)


if __name__ == "__main__":
    main()
