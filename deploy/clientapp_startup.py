"""Time what a fresh ClientApp process pays before it can train, per model.

In a deployment, Flower 1.42 starts one ``flwr-clientapp`` process per message (query, train,
evaluate), so this cost is paid for every message, not once per node (the per-process model
cache in ``fedtune.pipeline`` only helps in simulation, where Ray reuses its actors).

    python deploy/clientapp_startup.py --model tiny-bert --model minilm [--repeat 3]

Each measurement is a new Python process that imports the ClientApp module (flwr, torch,
transformers, fedtune), then builds the federation (reads and partitions the data) and the
workbench (loads the model, attaches the adapter), the same calls a train message makes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import clients.client_app  # noqa: F401  (flwr, torch, transformers, fedtune)
t1 = time.perf_counter()
from fedtune import pipeline
from fedtune.config import defaults_from_pyproject, parse
from pathlib import Path
cfg = parse({{**defaults_from_pyproject(Path({root!r}) / "pyproject.toml"), **json.loads({cfg!r})}})
fed = pipeline.federation(cfg)
t2 = time.perf_counter()
pipeline.workbench(cfg, fed)
t3 = time.perf_counter()
cpu = time.process_time()  # CPU seconds of this process: less sensitive to a busy machine
print(json.dumps({{"import": t1 - t0, "data": t2 - t1, "model": t3 - t2, "total": t3 - t0, "cpu": cpu}}))
"""


def measure(model: str, data_path: Path) -> dict[str, float]:
    cfg = {
        "model": model,
        "dataset": "file",
        "data-path": str(data_path),
        "text-column": "sentence",
        "label-column": "sentiment",
        "partitioning": "iid",
        "num-partitions": 3,
        "device": "cpu",
    }
    code = _CHILD.format(root=str(ROOT), cfg=json.dumps(cfg))
    env_cmd = [sys.executable, "-c", code]
    out = subprocess.run(env_cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.helpers import write_sentiment_csv

    with tempfile.TemporaryDirectory() as tmp:
        data = write_sentiment_csv(Path(tmp) / "data.csv", n=240)
        print(f"median of {args.repeat} fresh processes; wall seconds except the CPU column")
        print("| model | import | data | model load | total wall | total CPU |")
        print("|---|---|---|---|---|---|")
        for model in args.model or ["tiny-bert", "minilm"]:
            runs = [measure(model, data) for _ in range(args.repeat)]
            med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
            print(
                f"| {model} | {med['import']:.2f} | {med['data']:.2f} | {med['model']:.2f} | {med['total']:.2f} | {med['cpu']:.2f} |"
            )


if __name__ == "__main__":
    main()
