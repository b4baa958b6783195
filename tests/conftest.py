"""Shared fixtures: tiny configs, quiet libraries, offline everywhere."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from fedtune import pipeline

pipeline.quiet_libraries()


@pytest.fixture
def tiny_run_config(tmp_path):
    """A flat run_config for a fast run: tiny BERT, a small user CSV, 3 IID clients."""
    from tests.helpers import write_sentiment_csv

    csv_path = write_sentiment_csv(tmp_path / "data.csv", n=240)
    return {
        "model": "tiny-bert",
        "dataset": "file",
        "data-path": str(csv_path),
        "text-column": "sentence",
        "label-column": "sentiment",
        "partitioning": "iid",
        "num-partitions": 3,
        "max-test-examples": 40,
        "local-steps": 2,
        "batch-size": 8,
        "num-rounds": 2,
        "max-length": 16,
        "min-train-nodes": 2,
        "min-available-nodes": 2,
        "output-dir": str(tmp_path / "runs"),
    }


@pytest.fixture
def isolated_registries():
    """Methods a test registers (plug-ins) are gone again after it: other tests iterate the
    registries and must see only fedtune's own methods."""
    from fedtune import adapters, codecs, merging, parts, trainers
    from fedtune.merging import server_opt

    regs = [
        adapters.REGISTRY,
        codecs.REGISTRY,
        merging.base.MERGERS,
        server_opt.SERVER_OPTS,
        trainers.REGISTRY,
    ]
    saved = [dict(r._items) for r in regs]
    loaded = dict(parts._LOADED)
    yield
    for r, items in zip(regs, saved, strict=True):
        r._items.clear()
        r._items.update(items)
    parts._LOADED.clear()
    parts._LOADED.update(loaded)
