"""Hand-computed oracles for the robust and the exotic mergers."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune import merging
from fedtune.registry import RegistryError


def _rows(rows: list[list[float]]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(r, dtype=torch.float32)} for r in rows]


def _cat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


def _deltas(seed: int, n: int, shapes: dict[str, tuple[int, ...]]) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(*s, generator=g) for k, s in shapes.items()} for _ in range(n)]


# ----------------------------------------------------------------------------- robust


def test_median_odd_and_even() -> None:
    out = merging.get("median").merge(_rows([[1, 5], [3, -1], [2, 0]]), [1, 100, 1])
    assert out["w"].tolist() == [2.0, 0.0]  # weights ignored
    out = merging.get("median").merge(_rows([[1], [3], [10], [4]]), [1, 1, 1, 1])
    assert out["w"].tolist() == [3.5]  # np.median: mean of the two middle values


def test_median_and_trimmed_mean_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    d = _deltas(1, 5, {"a": (40, 30), "b": (11,)})
    w = [1.0] * 5
    a = _cat(merging.get("median").merge(d, w))
    b = _cat(merging.get("trimmed-mean").merge(d, w))
    monkeypatch.setattr("fedtune.merging.base.BATCH_BUDGET", 7)  # 1024-coordinate chunks
    assert torch.equal(a, _cat(merging.get("median").merge(d, w)))
    assert torch.equal(b, _cat(merging.get("trimmed-mean").merge(d, w)))
    flat = torch.stack([_cat(x) for x in d])
    assert torch.equal(a, flat.median(dim=0).values)  # odd n: the middle value


def test_trimmed_mean_oracle() -> None:
    out = merging.get("trimmed-mean").merge(_rows([[1], [2], [3], [4], [100]]), [1] * 5)
    assert out["w"].tolist() == [3.0]  # cut = int(0.2 * 5) = 1 per tail
    out = merging.get("trimmed-mean", beta=0.25).merge(_rows([[1], [2], [6], [100]]), [1] * 4)
    assert out["w"].tolist() == [4.0]
    out = merging.get("trimmed-mean", beta=0.1).merge(_rows([[1], [2], [6]]), [1] * 3)
    assert out["w"].tolist() == [3.0]  # cut 0: plain mean
    with pytest.raises(RegistryError, match="beta"):
        merging.get("trimmed-mean", beta=0.5)


def test_krum_and_multi_krum_oracle() -> None:
    # squared distances: c0 {0.01, 0.04, 100}, c1 {0.01, 0.01, 98.01}, c2 {0.04, 0.01, 96.04},
    # c3 {100, 98.01, 96.04}; n - f - 2 = 2 neighbours: scores 0.05, 0.02, 0.05, 194.05
    d = _rows([[0.0], [0.1], [0.2], [10.0]])
    out = merging.get("krum").merge(d, [1, 1, 2, 1])
    assert out["w"].tolist() == pytest.approx([0.1])
    # Multi-Krum keeps c1, c0, c2 and takes their weighted mean (0 + 0.1 + 2 * 0.2) / 4
    out = merging.get("multi-krum", to_keep=3).merge(d, [1, 1, 2, 1])
    assert out["w"].tolist() == pytest.approx([0.125])
    # default to_keep = n - f
    out = merging.get("multi-krum", num_malicious=1).merge(d, [1, 1, 2, 1])
    assert out["w"].tolist() == pytest.approx([0.125])


def test_krum_rejects_outlier_in_high_dimension(monkeypatch: pytest.MonkeyPatch) -> None:
    d = _deltas(2, 6, {"a": (50, 50)})
    d[4] = {"a": d[4]["a"] * 50}
    monkeypatch.setattr("fedtune.merging.base.BATCH_BUDGET", 6 * 1024)  # several Gram chunks
    out = merging.get("multi-krum", num_malicious=1).merge(d, [1] * 6)
    ref = sum(_cat(x) for i, x in enumerate(d) if i != 4) / 5
    assert torch.allclose(_cat(out), ref, atol=1e-5)


# ----------------------------------------------------------------------------- exotic


def test_magmax_oracle() -> None:
    out = merging.get("magmax").merge(_rows([[1, -3], [-2, 2], [0.5, 3]]), [1, 1, 1])
    assert out["w"].tolist() == [-2.0, 3.0]  # |-3| == |3|: the later client wins
    out = merging.get("magmax", scale=0.5).merge(_rows([[1, -3], [-2, 2]]), [1, 0])
    assert out["w"].tolist() == [0.5, -1.5]  # zero weight: skipped


def test_fedgma_oracle() -> None:
    d = _rows([[1, 1], [1, -1], [1, -1]])
    # col0: agree 1 -> mean 1; col1: agree |1 - 1 - 2| / 4 = 0.5 -> 0.5 * (-2 / 4)
    out = merging.get("fedgma").merge(d, [1, 1, 2])
    assert out["w"].tolist() == [1.0, -0.25]
    out = merging.get("fedgma", threshold=0.5).merge(d, [1, 1, 2])
    assert out["w"].tolist() == [1.0, -0.5]
    out = merging.get("fedgma", threshold=0.0).merge(d, [1, 1, 2])
    assert out["w"].tolist() == _cat(merging.get("fedavg").merge(d, [1, 1, 2])).tolist()


def test_model_stock_oracle() -> None:
    d = [
        {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 1.0]), "c": torch.tensor([1.0, 0.0])},
        {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([2.0, 2.0]), "c": torch.tensor([0.5, math.sqrt(3) / 2])},
    ]  # fmt: skip
    out = merging.get("model-stock").merge(d, [1, 1])
    assert torch.allclose(out["a"], torch.zeros(2), atol=1e-6)  # cos 0 -> t = 0 (the base)
    assert torch.allclose(out["b"], torch.tensor([1.5, 1.5]))  # cos 1 -> t = 1
    t = 2 * 0.5 / (1 + 0.5)  # cos 0.5
    assert torch.allclose(out["c"], t * torch.tensor([0.75, math.sqrt(3) / 4]), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        merging.get("model-stock").merge(d[:1], [1])


def test_model_stock_streaming_identity_matches_pairwise_cosines() -> None:
    d = _deltas(3, 4, {"a": (6, 5)})
    d[0]["a"] = d[0]["a"].abs()
    d[1]["a"] = d[1]["a"].abs()
    d[2]["a"] = d[2]["a"].abs()
    d[3]["a"] = d[3]["a"].abs()  # positive cosines, so no clamping
    u = [x["a"].reshape(-1) / x["a"].norm() for x in d]
    cos = sum(float(u[i] @ u[j]) for i in range(4) for j in range(4) if i != j) / 12
    t = 4 * cos / (1 + 3 * cos)
    ref = t * sum(x["a"] for x in d) / 4
    out = merging.get("model-stock").merge(d, [2, 2, 2, 2])
    assert torch.allclose(out["a"], ref, atol=1e-6)


def test_consensus_oracle() -> None:
    # λ = 0.6, τ_MTL = column sums [5, 3, 4].
    # col0 [3, 3, -1]: 3 > 0.6*2 twice, 1 > 0.6*6 no -> 2 masks -> keep mean 5/3
    # col1 [1, 1, 1]: 1 > 0.6*2 never -> 0;  col2 [4, 0, 0]: only c0 -> 1 mask
    d = _rows([[3, 1, 4], [3, 1, 0], [-1, 1, 0]])
    out = merging.get("consensus").merge(d, [1, 1, 1])
    assert torch.allclose(out["w"], torch.tensor([5 / 3, 0.0, 0.0]))
    out = merging.get("consensus", min_agree=1).merge(d, [1, 1, 1])
    assert torch.allclose(out["w"], torch.tensor([5 / 3, 0.0, 4 / 3]))
    with pytest.raises(ValueError, match="min_agree=2"):
        merging.get("consensus").merge(d[:1], [1])


def test_breadcrumbs_oracle() -> None:
    row = [10, 1, -5, 0.5, 3, -2, 0.1, 0.2, 4, 6]
    # c = 10: drop floor(0.1*10) = 1 outlier (10), keep the next floor(0.3*10) = 3: 6, -5, 4
    d = [{"w": torch.tensor([row, row[::-1]], dtype=torch.float32), "s": torch.tensor(2.0)}]
    out = merging.get("breadcrumbs", density=0.3, gamma=0.1).merge(d, [1])
    kept = [0, 0, -5, 0, 0, 0, 0, 0, 4, 6]
    assert out["w"].tolist() == [kept, kept[::-1]]  # per row
    assert out["s"].item() == 2.0  # 0-d tensors are left as they are


def test_breadcrumbs_gamma_zero_keeps_top_and_ties_mode() -> None:
    d = _rows([[5, -1, 2, 0.5], [-4, 3, -1, 0.2]])
    out = merging.get("breadcrumbs", density=0.5, gamma=0.0).merge(d, [1, 1])
    # c0 keeps [5, 0, 2, 0], c1 keeps [-4, 3, 0, 0]; mean
    assert out["w"].tolist() == [0.5, 1.5, 1.0, 0.0]
    out = merging.get("breadcrumbs", density=0.5, gamma=0.0, merge="ties").merge(d, [1, 1])
    assert out["w"].tolist() == [5.0, 3.0, 2.0, 0.0]


def _reference_pcb(flat: torch.Tensor, ratio: float, q: float) -> torch.Tensor:
    """Port of duguodong7/pcb-merging ``PCB_merge`` (sorting based)."""

    def normalize(x: torch.Tensor) -> torch.Tensor:
        lo = x.min(dim=1, keepdim=True).values
        hi = x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    def clamp(x: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
        d = x.size(1)
        s = torch.sort(x, dim=1).values
        lo = s[:, int(d * min_ratio)].unsqueeze(1)
        hi = s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    n, _ = flat.shape
    a = clamp(flat.abs(), q, q)
    clamped = torch.sign(flat) * a
    intra = torch.exp(n * normalize(a) ** 2)
    inter = torch.tanh(flat * flat.sum(dim=0))
    scale = normalize(clamp(intra * inter, 1 - ratio, 0))
    return (clamped * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)


@pytest.mark.parametrize(("ratio", "q"), [(0.1, 1e-2), (0.3, 1e-3)])
def test_pcb_matches_released_code(ratio: float, q: float) -> None:
    d = _deltas(5, 4, {"a": (40, 30), "b": (37,)})
    flat = torch.stack([_cat(x) for x in d])
    ref = _reference_pcb(flat, ratio, q)
    out = merging.get("pcb", ratio=ratio, clamp_q=q).merge(d, [3, 3, 3, 3])
    assert torch.allclose(_cat(out), ref, atol=1e-5, rtol=1e-4)
    out2 = merging.get("pcb", ratio=ratio, clamp_q=q, scale=2.0).merge(d, [1, 1, 1, 1])
    assert torch.allclose(_cat(out2), 2 * ref, atol=1e-5, rtol=1e-4)


def test_every_method_runs_on_a_lora_shaped_delta() -> None:
    d = _deltas(6, 5, {"q.lora_A": (4, 32), "q.lora_B": (32, 4), "v.lora_A": (4, 32)})
    for name in merging.names():
        out = merging.get(name).merge(d, [1, 2, 3, 4, 5], key=1)
        assert list(out) == list(d[0])
        for k, t in out.items():
            assert t.shape == d[0][k].shape and t.dtype == torch.float32
            assert bool(torch.isfinite(t).all()), name
