"""DP in coefficient space (docs/privacy.md §2): the sensitivity bound and the distribution of
the noise after reconstruction, for the subspace codec (shared SRHT basis) and dense."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune import codecs, rng
from fedtune.codecs.srht import _pow2
from fedtune.privacy import DPFedAvg, DPSpec, Space
from fedtune.privacy.client import privatize_payload
from fedtune.privacy.dp import ClientDP

LIKE = {  # a LoRA-like layout: two factor tensors and a dense-able head
    "layer.lora_A": torch.zeros(8, 48),
    "layer.lora_B": torch.zeros(40, 8),
    "classifier.weight": torch.zeros(3, 16),
}


def _codec(head: str = "subspace", k: int = 96):  # type: ignore[no-untyped-def]
    return codecs.get("subspace", k=k, head=head, seed=11)


@pytest.mark.parametrize("head", ["subspace", "dense"])
def test_clip_in_coefficients_bounds_the_update(head: str) -> None:
    """‖B_t (u/g)‖ <= ‖u‖: clipping u to C bounds the reconstructed update by C."""
    sp = Space(_codec(head), LIKE)
    assert sp.linear and sp.kind == "coefficients"
    for i in range(20):
        u = rng.normal(100 + i, 0, sp.dim()) * (1 + i)
        d = sp.delta(u, server_round=3)
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values()))
        assert norm <= float(u.double().norm()) * (1 + 1e-5)


def test_reconstructed_noise_has_the_stated_distribution() -> None:
    """Noise N(0, s² I_K) on u reconstructs to B_t ξ with B_t = Q (a partial isometry):
    every coordinate of block l is N(0, s² K_l / n_l), and Qᵀ recovers ξ exactly. Checked
    on 400 draws: per-coordinate variance within a chi-square bound, the mean near 0, the
    energy ‖Bξ‖² near s² Σ K_l d_l / n_l, and the round trip to coefficients."""
    c = _codec("subspace")
    sp = Space(c, LIKE)
    lay = c.layout(LIKE)
    s, draws = 0.3, 400
    k = sp.dim()
    samples = []
    for i in range(draws):
        xi = rng.normal(7, i, k) * s
        d = sp.delta(xi, server_round=5)
        samples.append(torch.cat([d[n].reshape(-1) for n in lay.sub]))
        if i < 3:  # the reconstruction keeps all of ξ: re-encoding gives ξ back
            back = sp.vector(sp.encode(xi, key=1, server_round=5, slot=0))
            assert torch.allclose(back, xi, atol=1e-5 * s)
    x = torch.stack(samples).double()  # (draws, d)
    expect = torch.cat(
        [torch.full((b - a,), s * s * kk / _pow2(b - a)) for a, b, kk in lay.blocks]
    ).double()
    var = x.pow(2).mean(0)  # known zero mean
    # pooled over coordinates of a block: mean of var/expect ~ 1 within 6 standard errors
    ratio = var / expect
    se = math.sqrt(2.0 / draws) / math.sqrt(ratio.numel())
    assert abs(float(ratio.mean()) - 1) < 6 * se * 3  # coordinates are correlated: 3x slack
    # each coordinate alone: chi-square with `draws` degrees of freedom, 6 sigma
    assert float((ratio - 1).abs().max()) < 6 * math.sqrt(2.0 / draws)
    assert float(x.mean(0).abs().max()) < 6 * math.sqrt(float(expect.max()) / draws)
    energy = float(x.pow(2).sum(1).mean())
    want = sum(s * s * kk * (b - a) / _pow2(b - a) for a, b, kk in lay.blocks)
    assert abs(energy / want - 1) < 6 * math.sqrt(2.0 / (draws * k))
    # the d/K gain: the same noise std per coordinate in parameter space costs d, not K
    d_total = sum(b - a for a, b, _ in lay.blocks)
    assert want < s * s * d_total


def test_central_dp_noise_lives_in_the_k_coefficients() -> None:
    """The server's noise (std z·C) is added to K numbers; decoded, it is B_t ξ."""
    c = _codec("dense")
    sp = Space(c, LIKE)
    dp = DPFedAvg(
        DPSpec(
            mode="central",
            noise_multiplier=2.0,
            clip_norm=0.5,
            num_clients=1,
            q=1.0,
            delta=1e-5,
            seeded_noise=True,
        )
    )
    zero = c.encode_coef(torch.zeros(sp.dim()), LIKE, key=9, round=1, slot=0)
    rel = dp.release(1, vectors=[sp.vector(zero)], dim=sp.dim())
    assert rel.vector is not None and rel.vector.numel() == sp.dim() < sum(
        t.numel() for t in LIKE.values()
    )
    assert abs(float(rel.vector.double().std()) / 1.0 - 1) < 0.25  # z*C = 1, K ~ 100 draws


def test_distributed_payload_roundtrip_dense() -> None:
    """A client's clipped, noised vector survives the dense codec's re-encoding (fp32)."""
    c = codecs.get("dense")
    sp = Space(c, LIKE)
    delta = {
        n: rng.normal(3, i, t.numel()).reshape(t.shape) for i, (n, t) in enumerate(LIKE.items())
    }
    payload = c.encode(delta, 5, round=2, slot=1)
    params = ClientDP(clip=0.1, noise_std=0.0, seeded=True)
    new, extra = privatize_payload(c, payload, LIKE, params, key=5, server_round=2, slot=1)
    u = sp.vector(new)
    assert float(u.norm()) == pytest.approx(0.1, rel=1e-5) and extra["dp-clip-bit"] == 0.0
    decoded = c.decode(new, LIKE, key=5, round=2, slot=1)
    assert torch.allclose(torch.cat([decoded[n].reshape(-1) for n in LIKE]), u)


def test_per_client_codecs_get_the_parameter_space() -> None:
    sp = Space(codecs.get("srht", k=32), LIKE)
    assert not sp.linear and sp.kind == "parameters"
    assert sp.dim() == sum(t.numel() for t in LIKE.values())
