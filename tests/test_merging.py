"""Core mergers: registry, plumbing, FedAvg, task arithmetic, TIES, DARE, aggregate, clip."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune import merging, rng
from fedtune.merging import sparsify
from fedtune.registry import RegistryError


def _deltas(seed: int, n: int, shapes: dict[str, tuple[int, ...]]) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(*s, generator=g) for k, s in shapes.items()} for _ in range(n)]


def _cat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


def _rows(rows: list[list[float]]) -> list[dict[str, torch.Tensor]]:
    """One single-tensor delta per row (the oracle layout of the research note)."""
    return [{"w": torch.tensor(r, dtype=torch.float32)} for r in rows]


SHAPES = {"lora_A": (3, 5), "lora_B": (4, 3), "bias": (2,)}
STREAMING = ["fedavg", "task-arithmetic", "ties", "magmax", "fedgma", "model-stock", "breadcrumbs"]
DETERMINISTIC = [*STREAMING, "median", "trimmed-mean", "krum", "multi-krum", "consensus", "pcb"]


# ----------------------------------------------------------------------------- registry


def test_registry_lists_all_methods() -> None:
    expected = {
        "fedavg", "task-arithmetic", "ties", "dare", "breadcrumbs", "consensus", "pcb",
        "magmax", "model-stock", "fedgma", "median", "trimmed-mean", "krum", "multi-krum",
    }  # fmt: skip
    assert expected <= set(merging.names())


def test_unknown_method_and_option_fail_fast() -> None:
    with pytest.raises(RegistryError, match=r"allowed: .*fedavg.*ties"):
        merging.get("tie")
    with pytest.raises(RegistryError, match="allowed: density, rescale, scale, scope"):
        merging.get("ties", densty=0.2)
    with pytest.raises(RegistryError, match="density"):
        merging.get("ties", density=1.5)
    with pytest.raises(RegistryError, match="scope"):
        merging.get("ties", scope="row")
    with pytest.raises(RegistryError, match="normalize"):
        merging.get("task-arithmetic", normalize="false")


def test_protocol_flags() -> None:
    for name in merging.names():
        m = merging.get(name)
        assert isinstance(m, merging.Merger)
        assert m.streaming == (name in [*STREAMING, "dare"]), name
        if m.streaming:
            assert callable(m.add) and callable(m.finish) and callable(m.reset)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- input checks


def test_bad_inputs_are_named() -> None:
    m = merging.get("fedavg")
    d = _deltas(0, 2, SHAPES)
    with pytest.raises(ValueError, match="2 deltas but 1 weights"):
        m.merge(d, [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        m.merge(d, [1.0, -1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        m.merge(d, [0.0, 0.0])
    bad = dict(d[1])
    bad["lora_A"] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"lora_A.*shape \(5, 3\)"):
        m.merge([d[0], bad], [1, 1])
    bad = dict(d[1])
    bad["bias"] = torch.tensor([float("nan"), 0.0])
    with pytest.raises(ValueError, match=r"bias.*NaN"):
        m.merge([d[0], bad], [1, 1])
    with pytest.raises(ValueError, match="float32"):
        m.merge([{k: v.double() for k, v in d[0].items()}], [1])
    with pytest.raises(ValueError, match="missing"):
        m.merge([d[0], {"lora_A": d[1]["lora_A"]}], [1, 1])
    with pytest.raises(ValueError, match="before any add"):
        m.finish()  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="at least one"):
        merging.get("median").merge([], [])


# ----------------------------------------------------------------------------- sparsify


@pytest.mark.parametrize("n", [50, 70_000])
def test_kth_largest_abs_matches_kthvalue(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    x[: n // 10] = 0.0
    x[n // 10 : n // 5] = 0.5  # ties
    for k in [1, 2, n // 20, n // 7, n // 2, n - 1, n]:
        got = sparsify.kth_largest_abs([x[:3], x[3:]], k)
        assert got.item() == torch.kthvalue(x.abs(), n - k + 1).values.item()


def test_kth_smallest_signed_and_chunk_independent() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100_000, generator=g) * 1e3
    for k in [1, 17, 50_000, 100_000]:
        a = sparsify.kth_smallest(lambda: [x], k)
        b = sparsify.kth_smallest(lambda: list(x.split(333)), k)
        assert a == b == torch.kthvalue(x, k).values.item()


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False, width=32),
            st.sampled_from([0.0, -0.0, 1.0, -1.0]),
        ),
        min_size=1,
        max_size=300,
    ),
    data=st.data(),
)
def test_kth_smallest_property(values: list[float], data: st.DataObject) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, x.numel()))
    step = data.draw(st.integers(1, 64))
    got = sparsify.kth_smallest(lambda: list(x.split(step)), k)
    assert got == torch.kthvalue(x, k).values.item()
    a = x.abs()
    got_abs = sparsify.kth_smallest(lambda: list(a.split(step)), k, nonneg=True)
    assert got_abs == torch.kthvalue(a, k).values.item()


def test_topk_count_and_threshold_edges() -> None:
    assert sparsify.topk_count(0.2, 10) == 2
    assert sparsify.topk_count(0.29, 100) == 29  # no float floor surprise
    x = torch.tensor([3.0, 0.0, -1.0, 2.0])
    assert sparsify.magnitude_threshold([x], 1.0) is None
    assert sparsify.magnitude_threshold([x], 0.1) == math.inf  # floor(0.4) = 0 kept
    t = sparsify.magnitude_threshold([x], 0.5)
    assert sparsify.magnitude_mask(x, t).tolist() == [True, False, False, True]
    # zeros are never kept, even when the threshold is 0
    z = torch.tensor([0.0, 0.0, 0.0, 1.0])
    t = sparsify.magnitude_threshold([z], 0.5)
    assert sparsify.magnitude_mask(z, t).tolist() == [False, False, False, True]


# ----------------------------------------------------------------------------- fedavg / TA


def test_fedavg_oracle() -> None:
    d = _rows([[1.0, 2.0], [3.0, -2.0]])
    out = merging.get("fedavg").merge(d, [1.0, 3.0])
    assert out["w"].tolist() == [2.5, -1.0]


def test_task_arithmetic_oracle() -> None:
    d = _rows([[1.0, 2.0], [3.0, -2.0]])
    out = merging.get("task-arithmetic", scale=0.5).merge(d, [1.0, 3.0])
    assert out["w"].tolist() == [1.25, -0.5]  # 0.5 * weighted mean
    out = merging.get("task-arithmetic", scale=0.5, normalize=False).merge(d, [1.0, 1.0])
    assert out["w"].tolist() == [2.0, 0.0]  # paper: λ · Σ τ_i with unit weights
    out = merging.get("task-arithmetic", normalize=False).merge(d, [1.0, 3.0])
    assert torch.allclose(out["w"], torch.tensor([5.0, -2.0]))  # Σ (w_i / mean w) τ_i


# ----------------------------------------------------------------------------- TIES


def test_ties_oracle_trim_elect_disjoint_mean_and_zero_sum() -> None:
    # Research note §3a oracle, density 1 (no trim). Column 2 sums to 0 -> 0 here (the paper
    # would fall back to the model-wide majority and give -0.5); column 4 is all zeros.
    t = _rows([[1, -2, 0.5, 3, 0], [2, 1, -0.5, -1, 0], [-4, 0.5, 0, -1, 0]])
    out = merging.get("ties", density=1.0).merge(t, [1, 1, 1])
    assert out["w"].tolist() == [-4.0, -2.0, 0.0, 3.0, 0.0]


def test_ties_oracle_weights() -> None:
    # Research note §3a weight oracle. Σ w x per column = [0, 2, -5.25]: column 0 is a zero
    # sum -> 0; column 1 positive -> (1*1 + 2*1) / (1 + 2) = 1; column 2 -> -3.
    d = _rows([[1, -2, 0.5], [-1.5, 1, 0.5], [0.5, 1, -3]])
    out = merging.get("ties", density=1.0).merge(d, [0.5, 1, 2])
    assert out["w"].tolist() == [0.0, 1.0, -3.0]


def test_ties_oracle_with_trim() -> None:
    # density 0.5 of 4 entries keeps the 2 largest |.| of each client:
    # c0 [4, -1, 0.5, -3] -> [4, 0, 0, -3];  c1 [-2, 5, 1, 0.1] -> [-2, 5, 0, 0]
    # c2 [1, 1, -6, 2] -> [0, 0, -6, 2] (tie 1 vs 1 at rank 3 is below the threshold 2)
    d = _rows([[4, -1, 0.5, -3], [-2, 5, 1, 0.1], [1, 1, -6, 2]])
    w = [1.0, 2.0, 1.0]
    # Σ w τ̂: [4 - 4, 10, -6, -3 + 2] = [0, 10, -6, -1]
    # col0 zero sum -> 0; col1 + -> 5; col2 - -> -6; col3 - -> only c0 agrees -> -3
    out = merging.get("ties", density=0.5).merge(d, w)
    assert out["w"].tolist() == [0.0, 5.0, -6.0, -3.0]
    out = merging.get("ties", density=0.5, scale=2.0).merge(d, w)
    assert out["w"].tolist() == [0.0, 10.0, -12.0, -6.0]


def test_ties_mean_norm_rescale_keeps_direction_and_takes_fedavgs_norm() -> None:
    # Same oracle as above: TIES gives [0, 5, -6, -3]; the weighted mean of the untrimmed
    # deltas is (Σ w x) / Σ w = [1, 10, -3.5, -0.8] / 4 (what the trim dropped counts too).
    d = _rows([[4, -1, 0.5, -3], [-2, 5, 1, 0.1], [1, 1, -6, 2]])
    w = [1.0, 2.0, 1.0]
    mean = torch.tensor([1.0, 10.0, -3.5, -0.8]) / 4
    ties = torch.tensor([0.0, 5.0, -6.0, -3.0])
    for scale in (1.0, 0.5):
        out = merging.get("ties", density=0.5, rescale="mean-norm", scale=scale).merge(d, w)["w"]
        want = ties * (mean.norm() / ties.norm()) * scale
        torch.testing.assert_close(out, want, rtol=1e-6, atol=0)
    # an all-zero round stays zero (no 0/0); a stage that changes the pieces is refused
    m = merging.get("ties", density=0.5, rescale="mean-norm")
    zero = _rows([[0, 0, 0, 0], [0, 0, 0, 0]])
    assert m.merge(zero, [1, 1])["w"].abs().sum() == 0
    with pytest.raises(RegistryError, match="rescale"):
        merging.get("ties", rescale="norm")
    from fedtune.merging.task_vectors import Magnitude, RandomDrop, Steps

    with pytest.raises(ValueError, match="Magnitude"):
        Steps(sparsify=(RandomDrop(0.5),), rescale="mean-norm")
    with pytest.raises(ValueError, match="Magnitude"):
        Steps(sparsify=(Magnitude(0.5), Magnitude(0.2)), rescale="mean-norm")


def test_ties_threshold_ties_all_kept() -> None:
    d = _rows([[1, 1, 1, 0.5]])
    out = merging.get("ties", density=0.25).merge(d, [1])
    assert out["w"].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_ties_global_vs_tensor_scope() -> None:
    d = [{"a": torch.tensor([10.0, 9.0]), "b": torch.tensor([1.0, 0.5])}]
    g = merging.get("ties", density=0.5).merge(d, [1])
    assert _cat(g).tolist() == [10.0, 9.0, 0.0, 0.0]
    t = merging.get("ties", density=0.5, scope="tensor").merge(d, [1])
    assert _cat(t).tolist() == [10.0, 0.0, 1.0, 0.0]


def _paper_ties(flat: torch.Tensor, K: float) -> torch.Tensor:
    """Port of the TIES reference (prateeky2806/ties-merging merge_utils.py): topk + mass
    sign election with the model-wide majority fallback + dis-mean."""
    _, d = flat.shape
    k = d - int(d * K)
    kth = flat.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    rows = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * rows
    return sel.sum(dim=0) / torch.clamp((sel != 0).sum(dim=0).float(), min=1)


def test_ties_matches_paper_reference_where_conventions_coincide() -> None:
    # Equal weights, whole-model trim; the reference keeps k+1 entries for K (kthvalue(d-k)),
    # so density (k+1)/d; random data has no zero-sum coordinates after trimming... except
    # where every client was trimmed, and there both give 0.
    d = _deltas(3, 6, SHAPES)
    flat = torch.stack([_cat(x) for x in d])
    D = flat.shape[1]
    K = 0.3
    ref = _paper_ties(flat, K)
    density = (int(D * K) + 1) / D
    out = merging.get("ties", density=density).merge(d, [2.0] * 6)
    assert torch.allclose(_cat(out), ref, atol=1e-6)


def test_ties_streaming_handles_large_adapter_with_radix_select() -> None:
    # > SMALL elements: the radix path; compare with a dense batch formula.
    d = _deltas(4, 3, {"big": (300, 300), "small": (7,)})
    w = [1.0, 2.0, 0.5]
    out = _cat(merging.get("ties", density=0.1).merge(d, w))
    flat = torch.stack([_cat(x) for x in d])
    k = int(0.1 * flat.shape[1])
    kth = torch.topk(flat.abs(), k, dim=1).values[:, -1:]
    tr = flat * (flat.abs() >= kth)
    wt = torch.tensor(w)[:, None]
    gamma = torch.sign((wt * tr).sum(0))
    agree = (torch.sign(tr) == gamma) & (tr != 0)
    ref = (wt * tr * agree).sum(0) / (wt * agree).sum(0).clamp_min(1e-30)
    assert torch.allclose(out, ref, atol=1e-6)


# ----------------------------------------------------------------------------- DARE


def test_dare_needs_key_and_is_reproducible() -> None:
    d = _deltas(5, 3, SHAPES)
    m = merging.get("dare", drop_rate=0.5)
    with pytest.raises(ValueError, match="needs a key"):
        m.merge(d, [1, 1, 1])
    a = _cat(m.merge(d, [1, 1, 1], key=7))
    b = _cat(m.merge(d, [1, 1, 1], key=7))
    c = _cat(m.merge(d, [1, 1, 1], key=8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_linear_oracle_from_rng_masks() -> None:
    d = _deltas(6, 2, SHAPES)
    p, key = 0.3, 11
    out = _cat(merging.get("dare", drop_rate=p).merge(d, [1.0, 3.0], key=key))
    ref = torch.zeros_like(out)
    for i, (x, w) in enumerate(zip(d, [1.0, 3.0], strict=True)):
        flat = _cat(x)
        keep = rng.uniform(rng.derive_key(key, i), 0, flat.numel()) < 1 - p
        ref += w * torch.where(keep, flat / (1 - p), 0.0)
    assert torch.allclose(out, ref / 4.0, atol=1e-6)


def test_dare_mask_independent_of_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    d = _deltas(7, 2, {"a": (50, 40), "b": (33,)})
    m = merging.get("dare", drop_rate=0.4, merge="ties", density=0.5)
    a = _cat(m.merge(d, [1, 2], key=5))
    monkeypatch.setattr("fedtune.merging.dare.chunk_size", lambda d, dev=None: 97)
    monkeypatch.setattr("fedtune.merging.ties.chunk_size", lambda d, dev=None: 101)
    b = _cat(m.merge(d, [1, 2], key=5))
    assert torch.equal(a, b)


def test_dare_drop_rate_zero_equals_fedavg_and_ties() -> None:
    d = _deltas(8, 4, SHAPES)
    w = [1.0, 2.0, 3.0, 4.0]
    lin = merging.get("dare", drop_rate=0.0).merge(d, w, key=1)
    avg = merging.get("fedavg").merge(d, w)
    assert torch.allclose(_cat(lin), _cat(avg), atol=1e-6)
    dt = merging.get("dare", drop_rate=0.0, merge="ties", density=0.4).merge(d, w, key=1)
    ti = merging.get("ties", density=0.4).merge(d, w)
    assert torch.allclose(_cat(dt), _cat(ti), atol=1e-6)


def test_dare_is_unbiased_on_average() -> None:
    d = [{"w": torch.full((20_000,), 2.0)}]
    out = merging.get("dare", drop_rate=0.75).merge(d, [1], key=3)["w"]
    kept = out != 0
    assert torch.all(out[kept] == 8.0)
    assert abs(kept.float().mean().item() - 0.25) < 0.02


def test_dare_rejects_density_with_linear() -> None:
    with pytest.raises(RegistryError, match="merge='ties'"):
        merging.get("dare", density=0.5)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 6), name=st.sampled_from(DETERMINISTIC))
def test_permutation_invariance(seed: int, n: int, name: str) -> None:
    if name == "krum":
        n = max(n, 4)  # n <= 3: the two closest clients always tie on score (order decides)
    d = _deltas(seed, n, SHAPES)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.rand(n, generator=g) + 0.1).tolist()
    perm = torch.randperm(n, generator=g).tolist()
    opts = {"min_agree": 1} if name == "consensus" else {}
    m = merging.get(name, **opts)
    a = _cat(m.merge(d, w))
    b = _cat(m.merge([d[i] for i in perm], [w[i] for i in perm]))
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6))
def test_fedavg_equals_weighted_mean(seed: int, n: int) -> None:
    d = _deltas(seed, n, SHAPES)
    w = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 10 + 0.01).tolist()
    out = _cat(merging.get("fedavg").merge(d, w))
    ref = sum(wi * _cat(x) for wi, x in zip(w, d, strict=True)) / sum(w)
    assert torch.allclose(out, ref, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(
    ["fedavg", "task-arithmetic", "ties", "magmax", "fedgma", "median", "trimmed-mean",
     "krum", "multi-krum", "pcb"]))  # fmt: skip
def test_single_client_at_full_density_returns_its_delta(seed: int, name: str) -> None:
    d = _deltas(seed, 1, SHAPES)
    opts: dict[str, object] = {"density": 1.0} if name == "ties" else {}
    if name == "pcb":
        opts = {"ratio": 1.0, "clamp_q": 0.0}
    if name == "fedgma":
        opts = {"threshold": 1.0}
    out = merging.get(name, **opts).merge(d, [3.0])
    if name == "pcb":
        # one client: every kept score is min-max normalised, so entries with score 0 (the
        # minimum) drop out; the rest return the delta exactly.
        nz = _cat(out) != 0
        assert torch.allclose(_cat(out)[nz], _cat(d[0])[nz], atol=1e-6)
        return
    assert torch.allclose(_cat(out), _cat(d[0]), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 5), c=st.floats(0.01, 100.0),
       name=st.sampled_from(DETERMINISTIC))  # fmt: skip
def test_scaling_all_weights_changes_nothing(seed: int, n: int, c: float, name: str) -> None:
    d = _deltas(seed, n, SHAPES)
    w = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.1).tolist()
    opts = {"min_agree": 1} if name == "consensus" else {}
    m = merging.get(name, **opts)
    a = _cat(m.merge(d, w))
    b = _cat(m.merge(d, [c * x for x in w]))
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), name=st.sampled_from([*STREAMING, "dare"]))
def test_streaming_equals_batch(seed: int, n: int, name: str) -> None:
    if name == "model-stock" and n < 2:
        n = 2
    d = _deltas(seed, n, SHAPES)
    w = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.1).tolist()
    opts: dict[str, object] = {"merge": "ties", "density": 0.5} if name == "dare" else {}
    m = merging.get(name, **opts)
    batch = _cat(m.merge(d, w, key=99))
    # streaming, fresh object, then the same object again (finish() resets)
    s = merging.get(name, **opts)
    for _ in range(2):
        for i, (x, wi) in enumerate(zip(d, w, strict=True)):
            s.add(x, wi, key=rng.derive_key(99, i))  # type: ignore[attr-defined]
        assert torch.equal(_cat(s.finish()), batch)  # type: ignore[attr-defined]


def test_reset_discards_partial_round() -> None:
    d = _deltas(9, 2, SHAPES)
    m = merging.get("ties")
    m.add(d[0], 1.0)  # type: ignore[attr-defined]
    m.reset()  # type: ignore[attr-defined]
    m.add(d[1], 1.0)  # type: ignore[attr-defined]
    only = merging.get("ties").merge([d[1]], [1.0])
    assert torch.equal(_cat(m.finish()), _cat(only))  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- clip / aggregate


def test_norm_clip() -> None:
    clip = merging.NormClip(max_norm=5.0)
    d = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}  # norm 5
    assert clip(d)["a"].tolist() == [3.0, 0.0]
    big = {k: v * 4 for k, v in d.items()}  # norm 20 -> scaled by 1/4
    out = clip(big)
    assert torch.allclose(out["a"], torch.tensor([3.0, 0.0]))
    assert torch.allclose(out["b"], torch.tensor([[0.0, 4.0]]))
    assert math.isclose(merging.NormClip.norm(out), 5.0, rel_tol=1e-6)
    assert big["a"].tolist() == [12.0, 0.0]  # input untouched
    assert clip({"z": torch.zeros(3)})["z"].tolist() == [0.0, 0.0, 0.0]
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            merging.NormClip(bad)


@pytest.mark.parametrize("name", ["fedavg", "ties", "median", "dare"])
def test_aggregate_applies_clip_then_merges(name: str) -> None:
    d = _deltas(10, 4, SHAPES)
    d[2] = {k: v * 100 for k, v in d[2].items()}
    w = [1.0, 2.0, 3.0, 4.0]
    clip = merging.NormClip(max_norm=1.0)
    m = merging.get(name)
    got = merging.aggregate(m, d, w, clip=clip, key=4)
    ref = merging.get(name).merge([clip(x) for x in d], w, key=4)
    assert torch.equal(_cat(got), _cat(ref))
    no_clip = merging.aggregate(merging.get(name), d, w, key=4)
    assert torch.equal(_cat(no_clip), _cat(merging.get(name).merge(d, w, key=4)))


def test_norm_clip_reject_lists_updates_over_r_times_the_round_bound() -> None:
    honest = [{"a": torch.tensor([3.0, 4.0])}, {"a": torch.tensor([0.0, 6.0])}]  # norms 5, 6
    huge, edge = {"a": torch.tensor([-300.0, -400.0])}, {"a": torch.tensor([0.0, 60.0])}
    rule = merging.NormClip(1.0, relative=True, reject=10.0)
    # median of (5, 6, 500, 60) = 33: only the 500 is over 10 x 33
    assert rule.oversized([*honest, huge, edge]) == [(2, 500.0, 33.0)]
    assert rule.oversized([*honest, edge]) == []  # 60 is exactly 10 x 6: kept
    assert rule.oversized([]) == []
    fixed = merging.NormClip(2.0, reject=2.0)  # absolute bound 2: drop over 4
    assert [i for i, *_ in fixed.oversized(honest)] == [0, 1]
    assert merging.NormClip(1.0, relative=True).oversized([huge, *honest]) == []  # off
    assert "reject above 10" in repr(rule)
    for bad in (0.5, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="reject"):
            merging.NormClip(1.0, reject=bad)


def test_norm_clip_median_mode_bounds_outliers_by_the_round_median() -> None:
    """FLAME-style adaptive clip: the bound is max_norm x the median norm of the round."""
    honest = [{"a": torch.tensor([3.0, 4.0])}, {"a": torch.tensor([0.0, 6.0])}]  # norms 5, 6
    attacker = {"a": torch.tensor([-300.0, -400.0])}  # norm 500
    rule = merging.NormClip(1.0, relative=True)
    fixed = rule.for_round([*honest, attacker])
    assert fixed.max_norm == 6.0 and not fixed.relative
    out = merging.aggregate(merging.get("fedavg"), [*honest, attacker], [1.0, 1.0, 1.0], clip=rule)
    ref = (honest[0]["a"] + honest[1]["a"] + attacker["a"] * (6.0 / 500.0)) / 3
    assert torch.allclose(out["a"], ref)
    # without the clip the attacker dominates the mean
    plain = merging.aggregate(merging.get("fedavg"), [*honest, attacker], [1.0, 1.0, 1.0])
    assert plain["a"][1] < -100
    assert merging.NormClip(2.0, relative=True).for_round(honest).max_norm == 11.0
    zero = {"a": torch.zeros(2)}
    assert merging.NormClip(1.0, relative=True).for_round([zero, zero]).max_norm > 0
    with pytest.raises(ValueError, match="NaN or Inf"):
        rule.for_round([{"a": torch.tensor([float("nan")])}])
