"""Issue 19: SecAgg+'s extra bytes and time per round, dense vs subspace vectors.

    nice -n 10 .venv/bin/python benchmarks/secagg_overhead.py [--clients 10] [--out ...]

Runs Flower's SecAgg+ protocol (fedtune/fl/secagg.py: the workflow's four stages and
``secaggplus_mod``) in process over a grid that copies every message as a transport would, for
m clients whose vectors have the size of MiniLM's LoRA adapter (dense, d + 1 with the clip bit)
or the subspace codec's K = 1024 coefficients (+1). Bytes are the records' sizes in both
directions (Flower's ``count_bytes``), summed over the four exchanges, against the plain
round's uplink (the codec's payload: 4 d bytes dense fp32, 2 K bytes subspace fp16). Time is
the protocol's wall time on this machine (shared and noisy: read the ratio between rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedtune.fl.secagg import maybe_secaggplus, run_protocol, secure_reply, workflow  # noqa: E402


def _value_bytes(v: object) -> int:
    if isinstance(v, bytes | str):
        return len(v)
    if isinstance(v, list):
        return sum(_value_bytes(x) for x in v)
    return 8


def _config_bytes(rec: object) -> int:
    """A ConfigRecord's keys and values (Flower's count_bytes refuses list values)."""
    return sum(len(k) + _value_bytes(v) for k, v in rec.items())  # type: ignore[attr-defined]


def _bytes(content: RecordDict) -> int:
    n = sum(r.count_bytes() for r in content.array_records.values())
    n += sum(_config_bytes(r) for r in content.config_records.values())
    return n + sum(r.count_bytes() for r in content.metric_records.values())


class Grid:
    def __init__(self, app: ClientApp, nodes: list[int]) -> None:
        self.app, self.ctx = app, {n: Context(1, n, {}, RecordDict(), {}) for n in nodes}
        self.down = self.up = 0

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        out = []
        for m in messages:
            self.down += _bytes(m.content)
            r = self.app(copy.deepcopy(m), self.ctx[m.metadata.dst_node_id])
            self.up += _bytes(r.content)
            out.append(copy.deepcopy(r))
        return out


def measure(m: int, dim: int, plain_up: int) -> dict[str, float]:
    g = np.random.default_rng(0)
    vecs = {n: g.uniform(-0.01, 0.01, dim) for n in range(1, m + 1)}
    app = ClientApp(mods=[maybe_secaggplus])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(secure_reply(torch.from_numpy(vecs[context.node_id]), 1.0, {}), reply_to=msg)

    grid = Grid(app, list(vecs))
    wf = workflow(threshold=0.6, clip_range=0.1, max_weight=1.0, timeout=60.0)
    t0 = time.perf_counter()
    mean, _got, stages = run_protocol(grid, 1, {n: RecordDict({}) for n in vecs}, wf)  # type: ignore[arg-type]
    secs = time.perf_counter() - t0
    assert mean is not None and stages == 4
    err = float(np.abs(np.asarray(mean) - np.mean(list(vecs.values()), axis=0)).max())
    return {
        "clients": m, "dim": dim, "secagg_up_bytes_per_client": grid.up / m,
        "secagg_down_bytes_per_client": grid.down / m, "plain_up_bytes_per_client": plain_up,
        "up_ratio": grid.up / m / plain_up, "protocol_seconds": round(secs, 3),
        "max_abs_error_vs_mean": err,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--dense-dim", type=int, default=74_883)  # MiniLM LoRA r=8 q,v + head
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/secagg_overhead.json"))
    args = ap.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rows = [
        {"codec": "dense", **measure(args.clients, args.dense_dim + 1, 4 * args.dense_dim)},
        {"codec": "subspace_k1024", **measure(args.clients, args.k + 1, 2 * args.k)},
    ]
    for r in rows:
        print(json.dumps(r))
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
