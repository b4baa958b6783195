"""Per-round metrics: the run folder, the JSONL log, the progress line and the summary table."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def create_run_dir(output_dir: str | Path, run_name: str = "") -> Path:
    """A new, empty run folder. Never reuses a non-empty one: nothing the user had is overwritten.

    A folder that holds only ``log.txt`` counts as empty: the launcher creates the run folder
    and starts its log before the ServerApp opens the same folder."""
    root = Path(output_dir).expanduser()
    base = run_name or time.strftime("run-%Y%m%d-%H%M%S")
    path = root / base
    i = 1
    while path.exists() and any(p.name != "log.txt" for p in path.iterdir()):
        path = root / f"{base}-{i}"
        i += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


class MetricsLog:
    """Appends one JSON object per line; the file is the run's record of every round."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, row: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean, sort_keys=False) + "\n")

    def truncate_after(self, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` (a resumed run redoes them)."""
        keep = [r for r in self.rows() if r.get("round", 0) <= last_round]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(self.path)

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def round_line(row: dict[str, Any]) -> str:
    """``round   3 | train loss 0.8123 | held-out acc 0.6512 loss 0.8011 | up 12.3 KB down 1.2 MB | 41.2 s``."""

    def f(v: Any, spec: str) -> str:
        return (
            "   -  "
            if v is None or (isinstance(v, float) and not math.isfinite(v))
            else format(v, spec)
        )

    metric = (
        f"acc {f(row.get('test-accuracy'), '.4f')}"
        if "test-accuracy" in row
        else f"ppl {f(row.get('test-perplexity'), '.2f')}"
    )
    return (
        f"round {row['round']:>3} | train loss {f(row.get('train-loss'), '.4f')} | "
        f"held-out {metric} loss {f(row.get('test-loss'), '.4f')} | "
        f"up {human_bytes(row.get('bytes-up', 0))} down {human_bytes(row.get('bytes-down', 0))}"
        + (f" | {row['seconds']:.1f} s" if row.get("seconds") is not None else "")
        + (f" | dropped {row['dropped-replies']}" if row.get("dropped-replies") else "")
        + (" | SKIPPED (too few valid replies)" if row.get("skipped") else "")
    )


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The per-round table as plain text (rendered with rich)."""
    from rich.console import Console
    from rich.table import Table

    acc = any("test-accuracy" in r for r in rows)
    t = Table(title="fedtune run")
    for col in (
        "round",
        "train loss",
        "held-out " + ("acc" if acc else "ppl"),
        "held-out loss",
        "bytes up",
        "bytes down",
        "seconds",
    ):
        t.add_column(col, justify="right")

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        t.add_row(
            str(r["round"]),
            f(r.get("train-loss"), ".4f"),
            f(r.get("test-accuracy") if acc else r.get("test-perplexity"), ".4f"),
            f(r.get("test-loss"), ".4f"),
            str(r.get("bytes-up", 0)),
            str(r.get("bytes-down", 0)),
            f(r.get("seconds"), ".1f"),
        )
    console = Console(record=True, width=120)
    with console.capture() as cap:
        console.print(t)
    return cap.get()
