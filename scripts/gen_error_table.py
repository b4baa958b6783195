"""Try every user error we know of and write the message each gives to docs/errors.md.

The messages are produced by running the real code (config parsing, data loading, model
loading, the launcher), not typed by hand; re-run after changing an error message.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedtune import pipeline  # noqa: E402
from fedtune.config import defaults_from_pyproject, parse  # noqa: E402

pipeline.quiet_libraries()


def attempt(over: dict) -> str:
    over = dict(over)
    partition = over.pop("partition", None)
    try:
        cfg = parse({**defaults_from_pyproject(), **over})
        fed = pipeline.federation(cfg)
        pipeline.workbench(cfg, fed)
        if partition is not None:
            fed.client(partition)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "(accepted)"


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    good = tmp / "ok.csv"
    with good.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(30):
            w.writerow([f"text {i}", ["a", "b"][i % 2]])
    one_class = tmp / "one.csv"
    one_class.write_text("text,label\nx,a\ny,a\n")
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"prompt": "hi"\n')
    cases = [
        ("typo in a key", {"local-step": 5}),
        ("wrong type", {"local-steps": "ten"}),
        ("out of range", {"lr": 50.0}),
        ("not a choice", {"partitioning": "random"}),
        ("unknown task", {"task": "seq2seq"}),
        ("bad device", {"device": "tpu"}),
        ("CUDA asked, none present", {"device": "cuda"}),
        ("unknown merger", {"merger": "tie"}),
        ("option the merger lacks", {"merger": "fedavg", "merger-density": 0.2}),
        ("bad merger option value", {"merger": "ties", "merger-density": 1.5}),
        ("unknown codec", {"codec": "zip"}),
        ("unknown server optimizer", {"server-opt": "adam"}),
        ("unknown adapter", {"adapter": "dora"}),
        ("MoS rank constraints", {"adapter": "mos", "mos-e": 4, "mos-r": 2}),
        ("unknown MoS ablation", {"mos-disable": "subsets"}),
        ("target module not in model", {"target-modules": "q_proj"}),
        ("min-train > min-available", {"min-train-nodes": 5, "min-available-nodes": 2}),
        (
            "missing data file",
            {
                "dataset": "file",
                "data-path": "/data/missing.csv",
                "partitioning": "iid",
                "num-partitions": 2,
            },
        ),
        ("no data path", {"dataset": "file", "partitioning": "iid", "num-partitions": 2}),
        (
            "missing text column",
            {
                "dataset": "file",
                "data-path": str(good),
                "text-column": "review",
                "partitioning": "iid",
                "num-partitions": 2,
            },
        ),
        (
            "one class only",
            {
                "dataset": "file",
                "data-path": str(one_class),
                "partitioning": "iid",
                "num-partitions": 1,
            },
        ),
        ("natural split without client column", {"dataset": "file", "data-path": str(good)}),
        (
            "more partitions than rows",
            {
                "dataset": "file",
                "data-path": str(good),
                "partitioning": "iid",
                "num-partitions": 500,
            },
        ),
        ("unknown dataset", {"dataset": "imdb"}),
        ("model not available offline", {"model": "bert-base-uncased"}),
        (
            "partition id out of range",
            {
                "dataset": "file",
                "data-path": str(good),
                "partitioning": "iid",
                "num-partitions": 2,
                "partition": 7,
            },
        ),
        ("exact factor mode with a nonlinear merger", {"factor-mode": "exact", "merger": "ties"}),
        (
            "exact factor mode with a server optimizer",
            {"factor-mode": "exact", "server-opt": "fedadam"},
        ),
        ("payload downlink with a nonlinear merger", {"downlink": "auto", "merger": "median"}),
        (
            "payload downlink with a BLAS-decoded codec",
            {"downlink": "payloads", "codec": "gaussian"},
        ),
        ("unknown clip mode", {"clip-mode": "mean", "clip-norm": 1.0}),
        ("clip-reject without a clip bound", {"clip-reject": 10.0}),
        (
            "direction-filter threshold out of range",
            {"robust-filter": "cosine", "robust-filter-threshold": 2.0},
        ),
        ("bad fault client list", {"fault": "hang", "fault-clients": "0,x"}),
        (
            "broken chat JSONL",
            {
                "task": "causal-lm",
                "model": "tiny-llama",
                "dataset": "file",
                "data-path": str(bad_json),
                "target-modules": "q_proj",
                "partitioning": "iid",
                "num-partitions": 1,
            },
        ),
    ]
    rows = ["| user error | config | message |", "|---|---|---|"]
    for what, over in cases:
        msg = attempt(over).replace("|", "\\|").replace("\n", " ").replace(str(tmp), "<tmp>")
        shown = " ".join(f"{k}={v!r}" for k, v in over.items() if k != "partition")
        shown = shown.replace(str(tmp), "<tmp>")
        rows.append(f"| {what} | `{shown}` | {msg} |")
    # the launcher turns these into one line on stderr and exit code 2 before Flower starts
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtune.launch",
            "-c",
            "local-steps='many'",
            "--flwr-home",
            str(tmp / "h"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    doc = ROOT / "docs" / "errors.md"
    doc.write_text(
        "# User errors and their messages\n\n"
        "Generated by `scripts/gen_error_table.py`, which runs each case through the real code "
        "(config parsing, data and model loading). `python -m fedtune.launch` / `make demo` print the "
        "message as one line on stderr and exit with code 2 before Flower starts, e.g.\n\n"
        f"```\n$ python -m fedtune.launch -c \"local-steps='many'\"   # exit code {proc.returncode}\n"
        f"{proc.stderr.strip()}\n```\n\n"
        "Bad client payloads are covered in docs/reliability.md.\n\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    main()
