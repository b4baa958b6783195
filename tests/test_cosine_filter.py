"""The direction filter (fedtune/merging/cosine_filter.py): who it drops and why."""

from __future__ import annotations

import json

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


def test_scores_match_a_direct_leave_one_out_computation() -> None:
    ds = _honest(6, 7)
    ds[2] = {k: -50 * v for k, v in ds[2].items()}
    flat = torch.stack([torch.cat([d["a"].reshape(-1), d["b"]]).double() for d in ds])
    unit = flat / flat.norm(dim=1, keepdim=True)
    want = []
    for i in range(len(ds)):
        med = torch.cat([unit[:i], unit[i + 1 :]]).median(dim=0).values
        want.append(float(unit[i] @ med / med.norm()))
    assert CosineFilter().scores(ds) == pytest.approx(want, rel=1e-10, abs=1e-12)


class _FixedScores(CosineFilter):
    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self._scores = scores

    def scores(self, deltas):  # type: ignore[no-untyped-def]
        return self._scores


def test_the_rule_on_the_default_federations_round_1_scores() -> None:
    """Scores measured on the real round-1 updates with americanair and united (0, 8) sending
    -100x: client 9, an honest airline, leans against the others (-0.018) but is no outlier
    (cut = min(0, median - 3 x 1.4826 x MAD) = -0.083): kept; the attackers are dropped."""
    real = [-0.175, 0.077, 0.012, 0.05, 0.106, 0.04, 0.078, 0.066, -0.172, -0.018, 0.08]
    dummy = [{"a": torch.zeros(1)}] * len(real)
    assert [i for i, _ in _FixedScores(real).outliers(dummy)] == [0, 8]
    # without the attack nothing is negative, so nothing is dropped
    clean = [0.261, 0.113, 0.01, 0.148, 0.113, 0.087, 0.093, 0.17, 0.263, 0.256, 0.133]
    assert _FixedScores(clean).outliers(dummy) == []


def test_too_few_updates_or_zero_updates_drop_nothing() -> None:
    ds = _honest(3, 1)
    assert CosineFilter().outliers([*ds[:2], {k: -v for k, v in ds[0].items()}]) == []
    zeros = [{"a": torch.zeros(3)} for _ in range(5)]
    assert CosineFilter().scores(zeros) == [0.0] * 5
    assert CosineFilter().outliers(zeros) == []


@pytest.mark.parametrize("bad", [1.5, -2.0, float("nan")])
def test_threshold_outside_minus_one_one_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="cosine threshold must be in"):
        CosineFilter(bad)


class _Rounds(CosineFilter):
    """A memory filter fed given per-round scores."""

    def __init__(self, rounds: list[list[float]]) -> None:
        super().__init__(memory=True)
        self._rounds = iter(rounds)

    def scores(self, deltas):  # type: ignore[no-untyped-def]
        return next(self._rounds)


def test_memory_judges_clients_by_their_mean_score() -> None:
    """Round 2 alone would drop no one (the attacker -0.04 is no outlier there); with
    memory its mean (-0.14) still is, and an honest client's one bad round is forgiven."""
    dummy = [{"a": torch.zeros(1)}] * 6
    slots = [10, 11, 12, 13, 14, 15]
    r1 = [-0.25, 0.10, 0.12, 0.08, 0.11, 0.09]
    r2 = [-0.04, 0.01, 0.03, -0.05, 0.02, 0.00]  # honest slot 13 has a bad round
    assert _FixedScores(r2).outliers(dummy) == []
    f = _Rounds([r1, r2])
    assert [i for i, _ in f.outliers(dummy, slots)] == [0]
    got = f.outliers(dummy, slots)
    assert [i for i, _ in got] == [0] and got[0][1] == pytest.approx(-0.145)
    assert f.history[13] == (pytest.approx(0.03), 2)


def test_memory_state_round_trips_exactly_and_needs_slots() -> None:
    f = _Rounds([[0.1 / 3, -0.2, 0.3, 0.4]])
    f.outliers([{"a": torch.zeros(1)}] * 4, [3, 1, 4, 2])
    g = CosineFilter(memory=True)
    g.load_state_dict(json.loads(json.dumps(f.state_dict())))
    assert g.history == f.history
    with pytest.raises(ValueError, match="one slot per update"):
        CosineFilter(memory=True).outliers(_honest(5, 1))


def test_last_scores_are_kept_for_the_log() -> None:
    f = _Rounds([[0.1, -0.3, 0.2, 0.15]])
    f.outliers([{"a": torch.zeros(1)}] * 4, [0, 1, 2, 3])
    assert f.last_scores == [0.1, -0.3, 0.2, 0.15]
    f.outliers([{"a": torch.zeros(1)}] * 2, [0, 1])  # too few: no decision, no scores
    assert f.last_scores == []
