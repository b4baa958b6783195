"""The direction filter (fedtune/merging/cosine_filter.py): who it drops and why."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune import rng
from fedtune.merging import CosineFilter


def _honest(n: int, seed: int, spread: float = 1.0) -> list[dict[str, torch.Tensor]]:
    """n updates = a shared direction + per-client noise (non-IID clients agree only partly)."""
    common = rng.normal(seed, 0, 300)
    return [
        {
            "a": (common[:200] + spread * rng.normal(seed, i + 1, 200)).view(10, 20),
            "b": common[200:] + spread * rng.normal(seed, 100 + i, 100),
        }
        for i in range(n)
    ]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), scale=st.sampled_from([1.0, 100.0]), n_bad=st.integers(1, 4))
def test_sign_flipped_updates_are_the_ones_dropped(seed: int, scale: float, n_bad: int) -> None:
    honest = _honest(11 - n_bad, seed)
    bad = [{k: -scale * v for k, v in honest[i].items()} for i in range(n_bad)]
    dropped = {i for i, _ in CosineFilter().outliers(honest + bad)}
    assert dropped == set(range(11 - n_bad, 11))


def test_scaled_updates_pass_the_filter() -> None:
    """A 100x boost keeps the direction: that is norm clipping's job, not the filter's."""
    honest = _honest(9, 3)
    boosted = [{k: 100 * v for k, v in honest[i].items()} for i in range(2)]
    assert CosineFilter().outliers(honest + boosted) == []


def test_cosines_match_a_direct_computation() -> None:
    ds = _honest(5, 7)
    flat = torch.stack([torch.cat([d["a"].reshape(-1), d["b"]]).double() for d in ds])
    med = flat.median(dim=0).values
    want = [float(f @ med / (f.norm() * med.norm())) for f in flat]
    assert CosineFilter().cosines(ds) == pytest.approx(want, rel=1e-12)


def test_too_few_updates_or_a_zero_median_drop_nothing() -> None:
    ds = _honest(2, 1)
    assert CosineFilter().outliers([ds[0], {k: -v for k, v in ds[0].items()}]) == []
    zeros = [{"a": torch.zeros(3)} for _ in range(4)]
    assert CosineFilter().outliers(zeros) == []


@pytest.mark.parametrize("bad", [1.5, -2.0, float("nan")])
def test_threshold_outside_minus_one_one_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="cosine threshold must be in"):
        CosineFilter(bad)
