"""Shared fixtures: tiny configs, quiet libraries, offline everywhere."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# every process a test starts (launcher, SuperLink, Ray's actors, SuperNodes) inherits one
# intra-op thread: 2 xdist workers on 2 cores, each starting processes that default to one
# OpenMP thread per core and spin-wait, otherwise slow each other down many times over
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest

from fedtune import pipeline

pipeline.quiet_libraries()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite on several xdist workers (most slow tests wait on process
    # start-up, not on a core); one intra-op thread each keeps 2 cores from being
    # oversubscribed. Results do not depend on it (tests/test_rng.py pins thread-count
    # invariance).
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (stable sort): on xdist workers they start at once and the many fast
    tests fill the gaps, instead of a 3-minute test starting last."""
    items.sort(key=lambda it: it.get_closest_marker("slow") is None)


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
