"""The simulated malicious clients of the robustness experiments (issue: reliability)."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune import attacks, parts
from fedtune.config import parse


def _delta() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(4, 5, generator=g), "b": torch.randn(7, generator=g)}


def _norm(d: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values()))


@pytest.mark.parametrize(
    ("fraction", "n", "k"), [(0.2, 11, 2), (0.0, 11, 0), (0.5, 4, 2), (1.0, 3, 3)]
)
def test_attackers_are_a_keyed_fixed_subset(fraction: float, n: int, k: int) -> None:
    cfg = parse({"attack": "sign-flip", "attack-fraction": fraction})
    got = parts.attackers(cfg, n)
    assert len(got) == k and got <= set(range(n))
    assert parts.attackers(cfg, n) == got  # a function of the config alone: fixed for the run
    if 0 < k < n:  # another seed draws another subset (for some seed)
        others = {
            frozenset(parts.attackers(parse({**cfg.to_flat(), "seed": s}), n)) for s in range(8)
        }
        assert len(others) > 1


def test_sign_flip_and_scale_are_exact_multiples() -> None:
    d = _delta()
    flipped = attacks.corrupt(d, "sign-flip", 100.0, key=1)
    scaled = attacks.corrupt(d, "scale", 100.0, key=1)
    for k in d:
        assert torch.equal(flipped[k], -100.0 * d[k])
        assert torch.equal(scaled[k], 100.0 * d[k])
    honest = attacks.corrupt(d, "sign-flip", 1.0, key=1)  # the honest-size flip
    assert all(torch.equal(honest[k], -d[k]) for k in d)


def test_noise_attack_is_keyed_and_has_scale_times_the_honest_norm() -> None:
    d = _delta()
    a = attacks.corrupt(d, "noise", 10.0, key=5)
    assert math.isclose(_norm(a), 10.0 * _norm(d), rel_tol=1e-5)
    assert all(torch.equal(a[k], attacks.corrupt(d, "noise", 10.0, key=5)[k]) for k in d)
    assert not torch.equal(a["a"], attacks.corrupt(d, "noise", 10.0, key=6)["a"])
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.corrupt(d, "swap", 1.0, key=5)
