"""Where a round of the default simulation goes, in process (issue 18, item 3).

    python benchmarks/profile_round.py [--run-config ...] [--threads 2] [--clients N]

Times, for the default configuration (or the overrides): importing torch and transformers,
building the federation (data + partitions), loading the model with its adapter, every sampled
client's local round (``local-steps`` training steps, as the ClientApp runs them), the server
round (decode + merge) and the held-out evaluation (``max-test-examples`` examples). Prints
one line per part and the round's split; ``--json`` writes it to a file. What Flower adds on
top (Ray start, per-actor model loading, messages) is measured by ``benchmarks/overhead.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
import torch  # noqa: E402  (timed: the import is part of every process's start-up)
import transformers  # noqa: E402, F401

T_IMPORT = time.perf_counter() - T0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-config", "-c", action="append", default=[])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clients", type=int, default=0, help="time only the first N clients")
    ap.add_argument("--json", default="", help="write the numbers to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from fedtune import pipeline, report
    from fedtune import round as rnd_
    from fedtune.simulate import build_config

    report.quiet_progress_bars()
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "import-s": T_IMPORT}
    t = time.perf_counter()
    cfg = build_config([*args.run_config, "output-dir='/tmp/fedtune-profile'"])
    fed = pipeline.federation(cfg)
    out["federation-s"] = time.perf_counter() - t
    t = time.perf_counter()
    wb = pipeline.workbench(cfg, fed)
    enc = pipeline.codec(cfg)
    out["model-load-s"] = time.perf_counter() - t

    state = dict(wb.initial)
    picks = rnd_.sample(cfg.seed, 1, len(fed.clients), cfg.fraction_train, cfg.min_train_nodes)
    if args.clients:
        picks = picks[: args.clients]
    updates, per_client = [], []
    for slot in picks:
        key = rnd_.client_key(cfg.seed, 1, slot)
        t = time.perf_counter()
        payload, m = pipeline.client_round(cfg, slot, state, key=key, server_round=1, slot=slot)
        per_client.append(time.perf_counter() - t)
        delta = rnd_.decode(enc, payload, wb.initial, key=key, server_round=1, slot=slot)
        updates.append(rnd_.Update(slot, delta, m["num-examples"], m.get("train-loss", 0.0), payload))
    out["clients"] = len(picks)
    out["client-round-s"] = per_client
    out["train-s"] = sum(per_client)
    out["step-s"] = sum(per_client) / (len(picks) * cfg.local_steps)
    t = time.perf_counter()
    res = pipeline.server_round(cfg)(1, state, updates)
    out["server-round-s"] = time.perf_counter() - t
    t = time.perf_counter()
    ev = pipeline.evaluate_state(cfg, res.state)
    out["eval-s"] = time.perf_counter() - t
    out["eval-examples"] = len(fed.test)
    out["accuracy-after-1-round"] = ev.get("accuracy")

    total = out["train-s"] + out["server-round-s"] + out["eval-s"]
    print(f"torch threads {out['threads']}; one round of {len(picks)} clients x {cfg.local_steps} steps")
    for name, key in (
        ("import torch + transformers", "import-s"),
        ("federation (data, partitions)", "federation-s"),
        ("model + adapter load", "model-load-s"),
    ):
        print(f"  {name:34s} {out[key]:7.1f} s   (once per process)")
    for name, key in (
        ("client training", "train-s"),
        ("server round (decode + merge)", "server-round-s"),
        (f"evaluation ({len(fed.test)} examples)", "eval-s"),
    ):
        print(f"  {name:34s} {out[key]:7.1f} s   {100 * out[key] / total:5.1f} % of the round")
    print(f"  per training step                  {out['step-s']:7.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
