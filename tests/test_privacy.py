"""DP-FedAvg (fedtune/privacy): the noise, the accountant, the sampling, the config checks."""

from __future__ import annotations

import itertools
import json
import math

import dp_accounting as dpa
import pytest
import torch

from fedtune import parts
from fedtune import round as rnd
from fedtune.config import ConfigError, defaults_from_pyproject, parse
from fedtune.privacy import DPFedAvg, DPSpec, privatize_vector
from fedtune.privacy.accountant import noise_for_epsilon


def _spec(**kw: object) -> DPSpec:
    base = dict(
        mode="central", noise_multiplier=1.3, clip_norm=0.7, num_clients=1, q=1.0, delta=1e-5,
        seeded_noise=True,
    )  # fmt: skip
    return DPSpec(**{**base, **kw})  # type: ignore[arg-type]


def _std_bound(n: int) -> float:
    """6 standard errors of a sample std over n draws (relative): sd(s)/sigma ~ 1/sqrt(2n)."""
    return 6.0 / math.sqrt(2 * n)


def test_central_noise_std_is_z_times_c() -> None:
    d = 200_000
    dp = DPFedAvg(_spec())
    rel = dp.release(1, vectors=[torch.zeros(d)], dim=d)
    assert rel.vector is not None
    s = float(rel.vector.double().std())
    assert abs(s / (1.3 * 0.7) - 1) < _std_bound(d)
    assert abs(float(rel.vector.double().mean())) < 6 * 1.3 * 0.7 / math.sqrt(d)


def test_estimate_is_sum_over_expected_clients() -> None:
    """Fixed denominator q*n (McMahan et al. 2018): the sum of clipped updates over q*n."""
    dp = DPFedAvg(_spec(noise_multiplier=0.0, num_clients=10, q=0.4, clip_norm=1.0))
    big, small = torch.full((4,), 3.0), torch.full((4,), 0.1)  # norm 6 -> clipped to 1
    rel = dp.release(1, vectors=[big, small], dim=4)
    assert rel.vector is not None
    want = (big / 6.0 + small) / 4.0
    assert torch.allclose(rel.vector, want)
    assert rel.factors == pytest.approx([1 / 6, 1.0])


def test_distributed_noise_sums_to_z_times_c() -> None:
    d, m = 100_000, 8
    dp = DPFedAvg(_spec(mode="distributed", num_clients=m))
    params = dp.client_params(m, client_side=True)
    assert params is not None
    assert params.noise_std == pytest.approx(1.3 * 0.7 / math.sqrt(m))
    vecs, bits = [], []
    for i in range(m):
        v, b = privatize_vector(torch.zeros(d), params, issued_key=1000 + i)
        vecs.append(v)
        bits.append(b)
    total = torch.stack(vecs).double().sum(0)
    assert abs(float(total.std()) / (1.3 * 0.7) - 1) < _std_bound(d)
    rel = dp.release(1, vectors=vecs, bits=bits, sampled=m, dim=d)
    assert rel.vector is not None  # no server noise: the estimate is the clients' sum / (q n)
    assert torch.allclose(rel.vector.double(), total / m, atol=1e-5)


def test_distributed_dropout_tolerance() -> None:
    """With tolerance 0.25, 8 sampled clients each add noise for 6: 6 survivors apply, 5 skip."""
    dp = DPFedAvg(_spec(mode="distributed", num_clients=8, dropout_tolerance=0.25))
    p = dp.client_params(8, client_side=True)
    assert p is not None and p.noise_std == pytest.approx(1.3 * 0.7 / math.sqrt(6))
    ok = dp.release(1, vectors=[torch.zeros(3)] * 6, bits=[1.0] * 6, sampled=8, dim=3)
    assert ok.vector is not None
    skip = dp.release(2, vectors=[torch.zeros(3)] * 5, bits=[1.0] * 5, sampled=8, dim=3)
    assert skip.vector is None and "nothing applied" in skip.note
    assert dp.accountant.rounds == 2  # a sampled round is counted either way


def test_client_clip_bounds_the_norm() -> None:
    dp = DPFedAvg(_spec(mode="distributed", noise_multiplier=0.0))
    p = dp.client_params(1, client_side=True)
    assert p is not None
    v, bit = privatize_vector(torch.full((100,), 5.0), p, issued_key=3)
    assert float(v.norm()) == pytest.approx(0.7, rel=1e-5) and bit == 0.0
    v, bit = privatize_vector(torch.full((100,), 0.01), p, issued_key=3)
    assert torch.allclose(v, torch.full((100,), 0.01)) and bit == 1.0


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_accountant_epsilon_equals_the_library(kind: str) -> None:
    q, z, delta, rounds = 0.05, 1.1, 1e-3, 7
    dp = DPFedAvg(_spec(noise_multiplier=z, q=q, num_clients=200, delta=delta, accountant=kind))
    eps = [
        dp.release(t, vectors=[torch.zeros(2)], dim=2).info["dp-epsilon"]
        for t in range(1, rounds + 1)
    ]
    lib = dpa.rdp.RdpAccountant() if kind == "rdp" else dpa.pld.PLDAccountant()
    lib.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    assert eps[-1] == lib.get_epsilon(delta)
    assert all(a < b for a, b in itertools.pairwise(eps))


def test_adaptive_clipping_follows_andrew_et_al() -> None:
    """z_update = (z^-2 - (2 sigma_b)^-2)^-1/2, sigma_b = q n / 20; C moves by
    exp(-eta (unclipped fraction - gamma)); the accountant composes the combined z."""
    spec = _spec(num_clients=100, q=0.5, noise_multiplier=2.0, target_quantile=0.5, clip_lr=0.2)
    dp = DPFedAvg(spec)
    sb = 50 / 20
    assert spec.count_std == sb
    assert dp.z_update == pytest.approx((2.0**-2 - (2 * sb) ** -2) ** -0.5)
    spec0 = _spec(num_clients=100, q=0.5, noise_multiplier=2.0, target_quantile=0.5, clip_lr=0.2,
                  seeded_noise=True)  # fmt: skip
    dp = DPFedAvg(spec0)
    vecs = [torch.full((4,), 0.01)] * 50  # all unclipped: fraction ~ 1 -> C shrinks
    rel = dp.release(1, vectors=vecs, dim=4)
    frac = rel.info["dp-unclipped-fraction"]
    assert dp.clip == pytest.approx(0.7 * math.exp(-0.2 * (frac - 0.5)))
    assert dp.clip < 0.7
    with pytest.raises(ValueError, match="too large for adaptive clipping"):
        DPSpec(**{**spec.__dict__, "noise_multiplier": 6.0}).update_multiplier  # noqa: B018


def test_target_epsilon_stops_before_overspending() -> None:
    dp = DPFedAvg(
        _spec(q=0.1, num_clients=100, noise_multiplier=1.0, delta=1e-2, target_epsilon=1.0)
    )
    spent = 0.0
    while not dp.exhausted():
        spent = dp.release(dp.accountant.rounds + 1, vectors=[], dim=1).info["dp-epsilon"]
    assert 0 < spent <= 1.0 < dp.accountant.next_epsilon()


def test_noise_for_epsilon_hits_the_target() -> None:
    z = noise_for_epsilon("rdp", 0.1, 10, 4.0, 1e-2)
    dp = DPFedAvg(_spec(q=0.1, num_clients=100, noise_multiplier=z, delta=1e-2))
    assert dp.accountant.epsilon(10) == pytest.approx(4.0, abs=1e-3)


def test_poisson_sampling_is_what_the_accountant_assumes() -> None:
    """Each client independently with probability q: mean count q n, no minimum, keyed."""
    n, q, rounds = 200, 0.1, 300
    counts = [len(rnd.sample(5, t, n, q, 2, poisson=True)) for t in range(1, rounds + 1)]
    mean = sum(counts) / rounds
    assert abs(mean - q * n) < 6 * math.sqrt(q * (1 - q) * n / rounds)
    assert min(counts) < 2 * q * n and len(set(counts)) > 5  # varies; not a fixed size
    hits = [0] * n
    for t in range(1, rounds + 1):
        for i in rnd.sample(5, t, n, q, 2, poisson=True):
            hits[i] += 1
    assert max(hits) < q * rounds + 6 * math.sqrt(q * rounds)  # no client favoured
    assert rnd.sample(5, 3, n, q, 2, poisson=True) == rnd.sample(5, 3, n, q, 2, poisson=True)


# --------------------------------------------------------------------------- config checks
def _cfg(**kw: object):  # type: ignore[no-untyped-def]
    rc = {**defaults_from_pyproject(), **{k.replace("_", "-"): v for k, v in kw.items()}}
    cfg = parse(rc)
    parts.validate(cfg)
    return cfg


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(dp="central", merger="ties"), "merger' is 'ties', which is not linear"),
        (dict(dp="central", merger="median"), "not linear"),
        (dict(dp="central", merger="krum"), "not linear"),
        (dict(secagg="secaggplus", secagg_clip_range=1.0, merger="ties"), "not linear"),
        (dict(dp="central", robust_filter="cosine"), "cannot screen"),
        (dict(secagg="secaggplus", secagg_clip_range=1.0, robust_filter="cosine"), "cannot screen"),
        (dict(dp="distributed", codec="srht"), "shared linear basis"),
        (dict(secagg="secaggplus", secagg_clip_range=1.0, codec="srht"), "shared linear basis"),
        (dict(dp="central", clip_norm=1.0), "clips with dp-clip-norm"),
        (dict(secagg="secaggplus"), "secagg-clip-range' is 0"),
        (dict(dp_target_epsilon=2.0), "dp='none'"),
        (dict(dp="central", downlink="payloads"), "downlink"),
        (dict(dp="central", factor_mode="exact", server_opt="none"), "factor-mode"),
        (dict(dp="distributed", error_feedback=True), "error-feedback"),
    ],
)
def test_refused_with_one_line(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        _cfg(**kw)
    assert "\n" not in str(e.value)


def test_allowed_combinations() -> None:
    _cfg(dp="central", codec="srht")  # central DP on a per-client codec: parameter space
    _cfg(dp="distributed", codec="subspace", trainer="subspace")
    _cfg(dp="central", merger="task-arithmetic", server_opt="fedadam")
    _cfg(secagg="secaggplus", dp="distributed")


def test_adaptive_z_too_large_fails_before_round_1() -> None:
    cfg = _cfg(dp="central", dp_target_quantile=0.5, dp_noise_multiplier=20.0, fraction_train=1.0)
    with pytest.raises(ConfigError, match="too large for adaptive clipping"):
        parts.server_round(cfg, codec=parts.codec(cfg), like={"w": torch.zeros(2)}, num_clients=100)


# --------------------------------------------------------------------------- a whole run
def _run(tiny_run_config: dict, **kw: object) -> list[dict]:
    from fedtune.simulate import Simulation, build_config

    rc = {**tiny_run_config, "num-partitions": 6, "num-rounds": 3, **kw}
    sim = Simulation(build_config([" ".join(f"{k}={json.dumps(v)}" for k, v in rc.items())]),
                     echo=lambda s: None)  # fmt: skip
    sim.run()
    return [json.loads(x) for x in (sim.folder.path / "metrics.jsonl").read_text().splitlines()]


def test_simulation_logs_epsilon_and_stops_at_the_target(tiny_run_config: dict) -> None:
    rows = _run(
        tiny_run_config, dp="central", **{"dp-noise-multiplier": 2.0, "fraction-train": 0.5,
                                          "dp-target-epsilon": 1.0, "num-rounds": 20,
                                          "dp-seeded-noise": True}
    )  # fmt: skip
    eps = [r["dp-epsilon"] for r in rows[1:]]
    assert eps and all(a < b for a, b in itertools.pairwise(eps))
    assert eps[-1] <= 1.0 and len(rows) - 1 < 20  # stopped before overspending
    lib = dpa.rdp.RdpAccountant()
    lib.compose(dpa.PoissonSampledDpEvent(0.5, dpa.GaussianDpEvent(2.0)), len(eps))
    assert eps[-1] == lib.get_epsilon(1 / 6)  # delta = 1/N by default
    assert all(r["dp-delta"] == pytest.approx(1 / 6) for r in rows[1:])
