"""Small builders shared by tests (no network, tiny sizes)."""

from __future__ import annotations

import csv
from pathlib import Path

_WORDS = {
    "positive": ["great", "love", "wonderful", "happy", "excellent", "thanks"],
    "negative": ["awful", "hate", "terrible", "delayed", "worst", "angry"],
    "neutral": ["flight", "today", "gate", "ticket", "phone", "car"],
}


def write_sentiment_csv(path: Path, n: int = 120, with_client: bool = False) -> Path:
    """A deterministic 3-class CSV whose label is readable from its words."""
    labels = sorted(_WORDS)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "sentiment", "site"])
        for i in range(n):
            lab = labels[i % 3]
            words = _WORDS[lab]
            text = f"{words[i % 6]} {words[(i * 7) % 6]} item {i}"
            w.writerow([text, lab, f"site{i % 4}"])
    return path


def identity_replies(msgs: list, nodes: list[int]) -> list:
    """Mock replies to the strategy's identity query: node ``nodes[i]`` holds partition ``i``."""
    from unittest.mock import Mock

    from flwr.app import MetricRecord, RecordDict

    out = []
    for m in msgs:
        r = Mock()
        r.metadata.src_node_id = m.metadata.dst_node_id
        r.has_error.return_value = False
        pid = nodes.index(m.metadata.dst_node_id)
        r.content = RecordDict({"identity": MetricRecord({"partition-id": pid})})
        out.append(r)
    return out


def held_out_metrics(model, cfg) -> dict[str, float]:
    """Accuracy / loss of a (reloaded) classifier on the run's own held-out split."""
    import torch

    from fedtune import pipeline
    from fedtune.evaluate import evaluate_classifier
    from fedtune.train import collate_for, eval_batches

    fed = pipeline.federation(cfg)
    tok = pipeline.workbench(cfg, fed).tokenizer
    batches = eval_batches(fed.test, collate_for("classification", tok, cfg.max_length), 16)
    return evaluate_classifier(model, batches, torch.device("cpu"))


def make_strategy(
    *,
    codec,
    merger,
    server_opt,
    spec,
    run_seed,
    min_valid=1,
    clip=None,
    direction_filter=None,
    exact=None,
    **strategy_kw,
):
    """A FedTuneStrategy around a ServerRound with the given parts (screens built the way
    fedtune.parts builds them from a config: clip-reject first, then the direction filter)."""
    from fedtune.fl.strategy import FedTuneStrategy
    from fedtune.round import ClipReject, DirectionFilter, ServerRound

    screens = []
    if clip is not None and clip.reject:
        screens.append(ClipReject(clip))
    if direction_filter is not None:
        screens.append(DirectionFilter(direction_filter))
    sr = ServerRound(
        merger=merger,
        server_opt=server_opt,
        run_seed=run_seed,
        clip=clip,
        screens=screens,
        exact=exact,
        min_valid=min_valid,
    )
    return FedTuneStrategy(codec=codec, server_round=sr, spec=spec, run_seed=run_seed, **strategy_kw)
