"""Malicious-client table (issue 8) from finished run folders.

    python simulations/attack_table.py CLEAN_RUN_DIR ATTACKED_RUN_DIR... [--no-write]
        [--section S] [--title T]

Run the attacked configurations first, e.g. ``python -m fedtune.launch -c
simulations/m_signflip_median.toml``. For every run the table shows held-out accuracy / loss
after each round and the gap to the clean run at the same round, and the section
``malicious`` (or ``--section``) of docs/benchmarks.md is rewritten. The clean run is the
first argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import write_section  # noqa: E402


def rows(run: Path) -> dict[int, dict]:  # type: ignore[type-arg]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["round"]: r for r in map(json.loads, filter(None, lines))}


def describe(run: Path) -> str:
    cfg = json.loads((run / "config.json").read_text())
    what = f"merger `{cfg['merger']}`"
    if cfg.get("partitioning", "natural") != "natural":
        what = f"{cfg['partitioning']} split into {cfg['num-partitions']}; " + what
    if float(cfg.get("clip-norm", 0) or 0) > 0:
        what += f" + clip-norm {cfg['clip-norm']} ({cfg.get('clip-mode', 'fixed')})"
        if float(cfg.get("clip-reject", 0) or 0) > 0:
            what += f", drop over {cfg['clip-reject']}x"
    if cfg.get("server-opt", "none") != "none":
        opts = ", ".join(
            f"{k.removeprefix('server-opt-')} {v}"
            for k, v in cfg.items()
            if k.startswith("server-opt-") and v != ""
        )
        what += f" + server-opt `{cfg['server-opt']}` ({opts})"
    if cfg.get("robust-filter", "none") != "none":
        what += f" + robust-filter `{cfg['robust-filter']}`"
    if cfg.get("attack", "none") != "none":
        what += f"; attack `{cfg['attack']}` x{cfg['attack-scale']} on {cfg['attack-fraction']:.0%}"
    return what


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--section", default="malicious", help="docs/benchmarks.md section to write")
    ap.add_argument(
        "--title",
        default="Malicious clients: 2 of 11 send sign-flipped (x-100 or x-1) or boosted (x100) updates",
    )
    args = ap.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    clean = rows(runs[0])
    last = max(max(rows(r)) for r in runs)
    head = " | ".join(f"round {k}" for k in range(1, last + 1))
    lines = [
        f"## {args.title}",
        "",
        "Held-out accuracy / loss after each round, and in brackets the accuracy gap to the clean "
        f"run (`{runs[0].name}`) at the same round. `python simulations/attack_table.py "
        + " ".join(f"runs/{r.name}" for r in runs)
        + "`.",
        "",
        f"| run | setting | {head} |",
        "|---|---|" + "---|" * last,
    ]
    for run in runs:
        got = rows(run)
        cells = []
        for k in range(1, last + 1):
            if k not in got:
                cells.append("-")
                continue
            acc, loss = got[k]["test-accuracy"], got[k]["test-loss"]
            gap = f" ({100 * (acc - clean[k]['test-accuracy']):+.1f} pt)" if k in clean else ""
            cells.append(f"{acc:.3f} / {loss:.3f}{gap}")
        lines.append(f"| {run.name} | {describe(run)} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        write_section(args.section, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
