"""Quick in-process FedAvg-style rounds, without Flower or Ray, for tuning hyper-parameters.

    python simulations/inprocess.py '{"lr": 0.005, "local-steps": 20}' 3

Runs exactly the strategy's steps — ``pipeline.client_round`` for every client, decode,
``merging.aggregate``, server optimizer — in one process on a loaded or small machine. It is
not the system under test (use ``python -m fedtune.launch`` for that): no wire validation
beyond decoding, no sampling, no checkpoints. Prints held-out metrics after every round.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtune import merging, pipeline, rng
from fedtune.config import defaults_from_pyproject, parse


def main(overrides: dict[str, object], rounds: int) -> None:
    pipeline.quiet_libraries()
    cfg = parse({**defaults_from_pyproject(), "max-test-examples": 300, **overrides})
    fed = pipeline.federation(cfg)
    wb = pipeline.workbench(cfg, fed)
    state = dict(wb.initial)
    codec = pipeline.build_codec(cfg, salt=pipeline.layout_salt(cfg))
    merger = merging.get(cfg.merger, **dict(cfg.merger_options))
    opt = merging.get_server_opt(cfg.server_opt, **dict(cfg.server_opt_options))
    print(overrides, "r0", pipeline.evaluate_state(cfg, state), flush=True)
    for r in range(1, rounds + 1):
        t0, deltas, weights, up = time.perf_counter(), [], [], 0
        for pid in range(len(fed.clients)):
            key = rng.derive_key(cfg.seed, r, pid)
            payload, m = pipeline.client_round(cfg, pid, state, key=key, server_round=r, slot=pid)
            up += len(payload)
            deltas.append(codec.decode(payload, like=state, key=key, round=r, slot=pid))
            weights.append(m["num-examples"])
        merged = merging.aggregate(merger, deltas, weights, key=rng.derive_key(cfg.seed, r, 7))
        state = opt.step(state, merged)
        res = pipeline.evaluate_state(cfg, state)
        print(overrides, f"r{r}", res, "up", up, f"{time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main(
        json.loads(sys.argv[1]) if len(sys.argv) > 1 else {},
        int(sys.argv[2]) if len(sys.argv) > 2 else 3,
    )
