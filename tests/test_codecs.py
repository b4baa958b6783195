"""Codecs: registry, allocation, unbiasedness, MSE vs theory, determinism, error feedback."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtune import codecs, rng
from fedtune.codecs.projection import ProjectionCodec, allocate, default_k
from fedtune.codecs.srht import fwht
from fedtune.registry import RegistryError

SKETCHES = ["gaussian", "rademacher", "srht", "countsketch"]


def make_delta(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Three tensors of different sizes and norms (so the allocation matters)."""
    g = torch.Generator().manual_seed(seed)  # test data only; library code uses fedtune.rng
    return {
        "layer.0.lora_A": torch.randn(4, 40, generator=g) * scale,
        "layer.0.lora_B": torch.randn(60, 4, generator=g) * 0.3 * scale,
        "head.bias": torch.randn(17, generator=g) * 2 * scale,
    }


def sq(d: dict[str, torch.Tensor]) -> float:
    return float(sum((t.double() ** 2).sum() for t in d.values()))


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: a[n].double() - b[n].double() for n in a}


# --- registry and options ---------------------------------------------------------------------


def test_registry_lists_and_validates() -> None:
    builtin = {"dense", "gaussian", "rademacher", "srht", "countsketch", "spsa", "topk"}
    assert builtin <= set(codecs.names())
    c = codecs.get("srht", k=4096, coef_bits=8)
    assert isinstance(c, ProjectionCodec) and c.k == 4096
    with pytest.raises(RegistryError, match=r"allowed: .*coef_bits"):
        codecs.get("srht", bogus=1)
    with pytest.raises(RegistryError, match="unknown codec 'nope'; allowed: countsketch"):
        codecs.get("nope")
    with pytest.raises(RegistryError, match="coef_bits"):
        codecs.get("countsketch", coef_bits=4)
    with pytest.raises(RegistryError, match="coef_bits"):
        codecs.get("dense", coef_bits=1)
    with pytest.raises(RegistryError, match="k must"):
        codecs.get("gaussian", k=0)
    with pytest.raises(RegistryError, match=r"no option.*k"):
        codecs.get("dense", k=10)  # dense has no budget
    with pytest.raises(RegistryError, match="lr"):
        codecs.get("spsa")  # lr is required


def test_register_user_codec() -> None:
    @codecs.register("test-identity-codec")
    class Ident(codecs.get("dense").__class__):  # type: ignore[misc]
        pass

    assert "test-identity-codec" in codecs.names()
    with pytest.raises(RegistryError, match="already registered"):
        codecs.register("test-identity-codec")(object)  # type: ignore[arg-type]


# --- allocation ---------------------------------------------------------------------------------


def test_allocation_rule() -> None:
    sizes, norms = [1000, 1000, 4000, 50, 10], [1.0, 2.0, 1.0, 0.0, 5.0]
    ks = allocate(sizes, norms, 300, 2)
    assert sum(ks) == 300 and ks[3] == 0
    assert all(2 <= k <= s for k, s, n in zip(ks, sizes, norms, strict=True) if n > 0)
    # K_l proportional to sqrt(d_l) * ||x_l|| among the unconstrained blocks
    w = [math.sqrt(s) * n for s, n in zip(sizes, norms, strict=True)]
    assert abs(ks[1] / ks[0] - w[1] / w[0]) < 0.05 and abs(ks[2] / ks[0] - w[2] / w[0]) < 0.05
    # a block whose share reaches d_l is sent dense and the rest share what is left
    ks = allocate([10, 1000], [100.0, 1.0], 200, 2)
    assert ks == [10, 190]
    # a tiny share is raised to the minimum
    ks = allocate([1000, 1000], [1e-6, 1.0], 100, 2)
    assert ks == [2, 98]
    # budget >= d: everything dense
    assert allocate([5, 7], [1.0, 1.0], 100, 2) == [5, 7]
    assert default_k(10**5, 64) == 4096 and default_k(10**6, 64) == 15625
    assert default_k(10**8, 64) == 65536 and default_k(1000, 64) == 1000


# --- statistics: unbiasedness and MSE vs theory ---------------------------------------------------


@pytest.mark.parametrize("name", SKETCHES)
@pytest.mark.parametrize("coef_bits", [32, 8])
def test_unbiased_and_mse_matches_theory(name: str, coef_bits: int) -> None:
    delta = make_delta()
    codec = codecs.get(name, k=40, coef_bits=coef_bits)
    assert isinstance(codec, ProjectionCodec)
    theory = codec.theory_mse(delta)
    trials = 300
    mean = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in delta.items()}
    err = 0.0
    for t in range(trials):
        key = rng.derive_key(77, t)
        out = codec.decode(codec.encode(delta, key, round=1, slot=2), like=delta, key=key)
        for n in delta:
            mean[n] += out[n].double() / trials
        err += sq(diff(out, delta)) / trials
    ratio = err / theory
    assert 0.9 < ratio < 1.1, f"{name}: MSE/theory = {ratio:.3f}"
    # the mean of N unbiased estimates has squared error ~ theory / N
    bias = sq({n: mean[n] - delta[n].double() for n in delta})
    assert bias < 2.5 * theory / trials, (
        f"{name}: |mean-delta|^2 = {bias:.4g} vs {theory / trials:.4g}"
    )


def test_theory_values_per_basis() -> None:
    d, k = 1000, 50
    assert codecs.get("gaussian").omega(d, k) == (d + 1) / k  # type: ignore[attr-defined]
    assert codecs.get("rademacher").omega(d, k) == (d - 1) / k  # type: ignore[attr-defined]
    assert codecs.get("countsketch").omega(d, k) == (d - 1) / k  # type: ignore[attr-defined]
    assert codecs.get("srht").omega(1024, k) == pytest.approx((1024 - k) / k)  # type: ignore[attr-defined]


def test_sign_coefficients_gaussian_match_theory() -> None:
    """1-bit sign + norm with Gaussian bases: unbiased, MSE = ((pi/2) d - 1)/K ||x||^2."""
    g = torch.Generator().manual_seed(3)
    delta = {"w": torch.randn(200, generator=g)}
    d, k = 200, 25
    codec = codecs.get("gaussian", k=k, coef_bits=1)
    trials = 300
    err, mean = 0.0, torch.zeros(d, dtype=torch.float64)
    for t in range(trials):
        key = rng.derive_key(5, t)
        out = codec.decode(codec.encode(delta, key), like=delta, key=key)["w"].double()
        err += float(((out - delta["w"]) ** 2).sum()) / trials
        mean += out / trials
    theory = ((math.pi / 2) * d - 1) / k * sq(delta)
    assert 0.9 < err / theory < 1.1
    assert float(((mean - delta["w"]) ** 2).sum()) < 2.5 * theory / trials


def test_shrink_option_scales_by_one_over_one_plus_omega() -> None:
    delta = {"w": torch.randn(300)}
    key = rng.derive_key(9)
    for name in SKETCHES:
        unb = codecs.get(name, k=30)
        shr = codecs.get(name, k=30, unbiased=False)
        a = unb.decode(unb.encode(delta, key), like=delta)["w"]
        b = shr.decode(shr.encode(delta, key), like=delta)["w"]
        omega = unb.omega(300, 30)  # type: ignore[attr-defined]
        torch.testing.assert_close(b, a / (1 + omega), rtol=1e-6, atol=1e-7)


# --- exactness, determinism, layout ---------------------------------------------------------


def test_dense_round_trips() -> None:
    delta = make_delta(1)
    key = rng.derive_key(1)
    c32 = codecs.get("dense")
    out = c32.decode(c32.encode(delta, key), like=delta, key=key)
    for n in delta:
        assert out[n].dtype == torch.float32 and out[n].shape == delta[n].shape
        assert torch.equal(out[n], delta[n])
    c16 = codecs.get("dense", coef_bits=16)
    out = c16.decode(c16.encode(delta, key), like=delta)
    for n in delta:
        torch.testing.assert_close(
            out[n], delta[n], rtol=1e-3, atol=1e-3 * float(delta[n].abs().max())
        )
    c8 = codecs.get("dense", coef_bits=8)
    mean = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in delta.items()}
    for t in range(200):
        out = c8.decode(c8.encode(delta, rng.derive_key(t)), like=delta)
        for n in delta:
            step = float(delta[n].abs().max()) / 127
            assert float((out[n] - delta[n]).abs().max()) <= step * 1.0001
            mean[n] += out[n].double() / 200
    for n in delta:  # stochastic rounding is unbiased: error of the mean ~ step / sqrt(200)
        step = float(delta[n].abs().max()) / 127
        assert float((mean[n] - delta[n]).abs().max()) < step * 0.35


def test_budget_at_least_d_is_exact() -> None:
    delta = make_delta(2)
    for name in SKETCHES:
        c = codecs.get(name, k=10**6)
        out = c.decode(c.encode(delta, 5), like=delta)
        for n in delta:
            assert torch.equal(out[n], delta[n])


def test_zero_tensors_cost_nothing_and_decode_to_zero() -> None:
    delta = {"a": torch.zeros(100), "b": torch.randn(100)}
    c = codecs.get("srht", k=20)
    p = c.encode(delta, 5)
    out = c.decode(p, like=delta)
    assert torch.equal(out["a"], torch.zeros(100))
    assert len(p) == 40 + 8 + 20 * 4 + 4


_DECODE_SCRIPT = """
import hashlib, sys, torch
torch.set_num_threads(1)
from fedtune import codecs
sys.path.insert(0, "tests")
from test_codecs import make_delta
delta = make_delta(4)
for name in ["gaussian", "rademacher", "srht", "countsketch", "dense"]:
    c = codecs.get(name, coef_bits=8) if name == "dense" else codecs.get(name, k=50, coef_bits=8)
    out = c.decode(c.encode(delta, 123, round=2, slot=1), like=delta)
    print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in out.values())).hexdigest())
"""


def test_encode_and_decode_are_deterministic_across_thread_counts() -> None:
    delta = make_delta(4)
    digests = []
    for name in ["gaussian", "rademacher", "srht", "countsketch", "dense"]:
        c = (
            codecs.get(name, coef_bits=8)
            if name == "dense"
            else codecs.get(name, k=50, coef_bits=8)
        )
        p1, p2 = c.encode(delta, 123, round=2, slot=1), c.encode(delta, 123, round=2, slot=1)
        assert p1 == p2
        out = c.decode(p1, like=delta)
        digests.append(
            hashlib.sha256(b"".join(t.numpy().tobytes() for t in out.values())).hexdigest()
        )
    # one thread in a subprocess (switching torch's pool in-process slows later tests down)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    res = subprocess.run(
        [sys.executable, "-c", _DECODE_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=root,
    )
    assert res.stdout.split() == digests


def test_different_keys_give_different_bases() -> None:
    delta = make_delta(5)
    for name in SKETCHES:
        c = codecs.get(name, k=30)
        a = c.decode(c.encode(delta, 1), like=delta)
        b = c.decode(c.encode(delta, 2), like=delta)
        assert not torch.equal(a["layer.0.lora_A"], b["layer.0.lora_A"])


def test_large_tensors_split_into_blocks() -> None:
    delta = {"big": torch.randn(10, 100), "small": torch.randn(7)}
    c = codecs.get("countsketch", k=64, max_block=300)
    from fedtune.codecs import wire

    h, _ = wire.unpack(c.encode(delta, 3), 10**6)
    assert len(h.ks) == 5  # 1000 -> 4 blocks of 250, plus "small"
    out = c.decode(c.encode(delta, 3), like=delta)
    assert out["big"].shape == (10, 100)


def test_any_input_device_and_dtype_and_output_fp32_cpu() -> None:
    delta = {"w": torch.randn(64, dtype=torch.float64)}
    like = {"w": torch.empty(64, dtype=torch.float64)}
    c = codecs.get("srht", k=16)
    out = c.decode(c.encode(delta, 8), like=like)
    assert out["w"].dtype == torch.float32 and out["w"].device.type == "cpu"


def test_encode_rejects_bad_input() -> None:
    c = codecs.get("srht", k=16)
    with pytest.raises(ValueError, match="non-finite"):
        c.encode({"w": torch.tensor([1.0, float("nan")])}, 1)
    with pytest.raises(TypeError, match="floating"):
        c.encode({"w": torch.arange(4)}, 1)
    with pytest.raises(ValueError, match="key"):
        c.encode({"w": torch.ones(4)}, -1)
    with pytest.raises(ValueError, match="round"):
        c.encode({"w": torch.ones(4)}, 1, round=-1)
    with pytest.raises(TypeError):
        c.encode({}, 1)


def test_fwht_matches_hadamard_matrix() -> None:
    n = 16
    h = torch.tensor([[1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ h.T)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.ones(12))


# --- error feedback -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "opts"),
    [("countsketch", {"unbiased": False}), ("srht", {"coef_bits": 1, "unbiased": False})],
)
def test_error_feedback_bounds_accumulated_error(name: str, opts: dict[str, object]) -> None:
    """With EF, sum of decoded updates tracks sum of true updates; without it the bias piles up."""
    delta = make_delta(6, scale=0.01)
    codec = codecs.get(name, k=60, **opts)
    rounds = 40
    ef = codecs.ErrorFeedback()
    sum_ef = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in delta.items()}
    sum_plain = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in delta.items()}
    for t in range(rounds):
        key = rng.derive_key(11, t)
        sent = ef.apply(delta)
        out = codec.decode(codec.encode(sent, key, round=t), like=delta, key=key, round=t)
        ef.update(sent, out)
        state = ef.state_dict()  # survives a round trip through the client's saved state
        ef = codecs.ErrorFeedback()
        ef.load_state_dict(state)
        plain = codec.decode(codec.encode(delta, key, round=t), like=delta)
        for n in delta:
            sum_ef[n] += out[n].double()
            sum_plain[n] += plain[n].double()
    target = {n: rounds * delta[n].double() for n in delta}
    err_ef = math.sqrt(sq(diff(sum_ef, target)))  # type: ignore[arg-type]
    err_plain = math.sqrt(sq(diff(sum_plain, target)))  # type: ignore[arg-type]
    assert err_ef < 0.35 * err_plain, (err_ef, err_plain)
    # the accumulated error equals the final residual (telescoping sum)
    resid = math.sqrt(sq(ef.state_dict()))
    assert abs(err_ef - resid) < 1e-4 * (err_ef + 1e-12) + 1e-6


def test_error_feedback_diverges_with_unbiased_sketch() -> None:
    """Documented pitfall: an unbiased d/K sketch is not contractive, so EF blows up."""
    delta = {"w": torch.randn(400)}
    codec = codecs.get("countsketch", k=20)
    ef = codecs.ErrorFeedback()
    for t in range(8):
        sent = ef.apply(delta)
        ef.update(sent, codec.decode(codec.encode(sent, t), like=delta))
    assert sq(ef.state_dict()) > 100 * sq(delta)


def test_error_feedback_checks_names() -> None:
    ef = codecs.ErrorFeedback()
    ef.update({"a": torch.ones(3)}, {"a": torch.zeros(3)})
    assert torch.equal(ef.apply({"a": torch.ones(3)})["a"], torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="different tensors"):
        ef.apply({"b": torch.ones(3)})
    with pytest.raises(ValueError, match="finite"):
        ef.load_state_dict({"a": torch.tensor([float("inf")])})


def test_fwht_numpy_and_torch_paths_are_bit_identical() -> None:
    from fedtune.codecs.srht import _fwht_torch

    for n in (1, 2, 8, 32, 2048, 1 << 15):
        x = torch.randn(3, n)
        assert torch.equal(fwht(x), _fwht_torch(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_srht_encode_on_cuda_equals_cpu() -> None:
    """SRHT uses only exact butterflies and portable randomness: the payload is bit-identical."""
    delta = make_delta(8)
    c = codecs.get("srht", k=50)
    cuda = {n: t.cuda() for n, t in delta.items()}
    assert c.encode(delta, 17) == c.encode(cuda, 17)
