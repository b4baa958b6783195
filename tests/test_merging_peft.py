"""Parity with PEFT's ``peft.utils.merge_utils`` where the conventions coincide.

PEFT trims per tensor with ``topk`` (exactly ``int(density·numel)`` entries), elects the sign
on the *unweighted* trimmed sum (+1 when ``>= 0``) and divides the *weighted* agreeing sum
by the agreeing *count*. fedtune's ``ties`` with ``scope="tensor"`` coincides when

* all clients have equal weights and PEFT gets weight 1 (ours is invariant to the common
  weight; PEFT's result scales with it), and
* no coordinate has an exactly zero trimmed sum with some non-zero entries (PEFT elects +1
  there, fedtune gives 0) -- true almost surely for continuous random data, and
* no ties at the top-k threshold (PEFT keeps exactly k, fedtune keeps all tied entries).
"""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from fedtune import merging, rng
from fedtune.merging.sparsify import bernoulli_keep

pytestmark = pytest.mark.filterwarnings("ignore:The density .* no pruning:UserWarning")

SHAPES = {"q.lora_A": (8, 64), "q.lora_B": (64, 8), "v.lora_A": (8, 64), "v.lora_B": (64, 8)}


def _deltas(seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(*s, generator=g) for k, s in SHAPES.items()} for _ in range(n)]


@pytest.mark.parametrize(("n", "density"), [(2, 0.2), (5, 0.5), (7, 0.1), (3, 1.0)])
def test_ties_matches_peft_per_tensor(n: int, density: float) -> None:
    d = _deltas(n, n)
    ours = merging.get("ties", density=density, scope="tensor").merge(d, [0.3] * n)
    for name in SHAPES:
        ref = merge_utils.ties([x[name] for x in d], torch.ones(n), density=density)
        assert torch.allclose(ours[name], ref, atol=1e-6), name


def test_ties_differs_from_peft_on_a_zero_sum() -> None:
    # The documented difference: an exact zero sum elects +1 in PEFT and 0 here.
    d = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([-1.0, 1.0])}]
    ours = merging.get("ties", density=1.0, scope="tensor").merge(d, [1, 1])["w"]
    ref = merge_utils.ties([x["w"] for x in d], torch.ones(2), density=1.0)
    assert ours.tolist() == [0.0, 1.5]
    assert ref.tolist() == [1.0, 1.5]


def _patched_random_pruning(monkeypatch: pytest.MonkeyPatch, dropped: list[torch.Tensor]) -> None:
    """Make PEFT's Bernoulli pruning return our rng-drawn DARE deltas, in call order."""
    it = iter(dropped)

    def fake(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        out = next(it)
        assert out.shape == tensor.shape and rescale
        return out

    monkeypatch.setattr(merge_utils, "random_pruning", fake)


def _our_dropped(
    d: list[dict[str, torch.Tensor]], p: float, key: int
) -> dict[str, list[torch.Tensor]]:
    """Per tensor name, the dropped + rescaled delta of every client as ``dare`` draws it."""
    offsets, off = {}, 0
    for name, s in SHAPES.items():
        offsets[name] = off
        off += torch.Size(s).numel()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in SHAPES}
    for i, x in enumerate(d):
        k = rng.derive_key(key, i)
        for name, t in x.items():
            keep = bernoulli_keep(k, t.numel(), 1 - p, offset=offsets[name]).view(t.shape)
            out[name].append(torch.where(keep, t / (1 - p), 0.0))
    return out


@pytest.mark.parametrize("n", [2, 5])
def test_dare_ties_matches_peft_given_the_same_masks(
    monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    d, p, key = _deltas(10 + n, n), 0.4, 77
    ours = merging.get("dare", drop_rate=p, merge="ties").merge(d, [2.0] * n, key=key)
    dropped = _our_dropped(d, p, key)
    for name in SHAPES:
        _patched_random_pruning(monkeypatch, dropped[name])
        ref = merge_utils.dare_ties([x[name] for x in d], torch.ones(n), density=1 - p)
        assert torch.allclose(ours[name], ref, atol=1e-6), name


def test_dare_linear_matches_peft_given_the_same_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    n, p, key = 4, 0.3, 5
    d = _deltas(20, n)
    w = [1.0, 2.0, 3.0, 4.0]
    ours = merging.get("dare", drop_rate=p).merge(d, w, key=key)
    dropped = _our_dropped(d, p, key)
    for name in SHAPES:
        _patched_random_pruning(monkeypatch, dropped[name])
        # PEFT sums with the given weights; ours is the weighted mean: pass w / Σw.
        ref = merge_utils.dare_linear([x[name] for x in d], torch.tensor(w) / 10.0, density=1 - p)
        assert torch.allclose(ours[name], ref, atol=1e-6), name
