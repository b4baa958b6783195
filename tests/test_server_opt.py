"""Server optimizers (Reddi et al. 2021, Alg. 2; FedAvgM) against hand-computed steps."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune import merging
from fedtune.registry import RegistryError


def _x(v: list[float]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(v, dtype=torch.float32)}


def test_names_and_errors() -> None:
    assert {"none", "sgd", "fedavgm", "fedadam", "fedyogi", "fedadagrad"} <= set(
        merging.server_opt_names()
    )
    with pytest.raises(RegistryError, match=r"allowed: .*fedadam"):
        merging.get_server_opt("adam")
    with pytest.raises(RegistryError, match="allowed: beta1, lr, tau, v_init"):
        merging.get_server_opt("fedadagrad", beta2=0.9)
    with pytest.raises(RegistryError, match="lr"):
        merging.get_server_opt("fedadam", lr=0.0)
    opt = merging.get_server_opt("none")
    with pytest.raises(ValueError, match="different tensor names"):
        opt.step(_x([1.0]), {"v": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        opt.step(_x([1.0]), _x([1.0, 2.0]))


def test_none_and_sgd() -> None:
    g = _x([1.0, -2.0])
    assert merging.get_server_opt("none").step(g, _x([0.5, 0.5]))["w"].tolist() == [1.5, -1.5]
    out = merging.get_server_opt("sgd", lr=0.5).step(g, _x([1.0, 1.0]))
    assert out["w"].tolist() == [1.5, -1.5]
    assert g["w"].tolist() == [1.0, -2.0]  # inputs untouched


def test_fedavgm_two_steps() -> None:
    opt = merging.get_server_opt("fedavgm", lr=1.0, momentum=0.9)
    x = opt.step(_x([0.0]), _x([1.0]))  # v = 1
    assert x["w"].tolist() == [1.0]
    x = opt.step(x, _x([1.0]))  # v = 0.9 + 1
    assert x["w"].tolist() == pytest.approx([2.9])


def _adaptive_reference(
    kind: str, deltas: list[float], lr: float, b1: float, b2: float, tau: float
) -> float:
    """Scalar Reddi et al. Alg. 2 with v_{-1} = tau^2, written out by hand."""
    x, m, v = 0.0, 0.0, tau**2
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if kind == "fedadagrad":
            v = v + d * d
        elif kind == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
        x = x + lr * m / (math.sqrt(v) + tau)
    return x


def test_fedadam_first_step_by_hand() -> None:
    # m = 0.1 * 2 = 0.2; v = 0.99 * 1e-6 + 0.01 * 4 = 0.04000099
    opt = merging.get_server_opt("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    out = opt.step(_x([0.0]), _x([2.0]))
    expected = 0.1 * 0.2 / (math.sqrt(0.04000099) + 1e-3)
    assert out["w"].item() == pytest.approx(expected, rel=1e-6)


def test_fedyogi_and_adagrad_first_step_by_hand() -> None:
    yogi = merging.get_server_opt("fedyogi", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # v = 1e-6 - 0.01 * 4 * sign(1e-6 - 4) = 1e-6 + 0.04
    out = yogi.step(_x([0.0]), _x([2.0]))
    assert out["w"].item() == pytest.approx(0.1 * 0.2 / (math.sqrt(0.040001) + 1e-3), rel=1e-6)
    ada = merging.get_server_opt("fedadagrad", lr=0.1, beta1=0.9, tau=1e-3)
    out = ada.step(_x([0.0]), _x([2.0]))  # v = 1e-6 + 4
    assert out["w"].item() == pytest.approx(0.1 * 0.2 / (math.sqrt(4.000001) + 1e-3), rel=1e-6)


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_multi_step_matches_scalar_reference(kind: str) -> None:
    deltas = [2.0, -1.0, 0.5, 0.5, -3.0]
    opts = {"lr": 0.05, "beta1": 0.9, "tau": 1e-2}
    if kind != "fedadagrad":
        opts["beta2"] = 0.9
    opt = merging.get_server_opt(kind, **opts)
    x = _x([0.0])
    for d in deltas:
        x = opt.step(x, _x([d]))
    ref = _adaptive_reference(kind, deltas, 0.05, 0.9, 0.9, 1e-2)
    assert x["w"].item() == pytest.approx(ref, rel=1e-5)


def test_v_init_zero_is_flower_start() -> None:
    opt = merging.get_server_opt("fedadam", lr=1.0, beta1=0.0, beta2=0.0, tau=1e-9, v_init=0.0)
    out = opt.step(_x([0.0, 0.0]), _x([3.0, -0.5]))  # m = Δ, v = Δ² -> step = sign(Δ)
    assert torch.allclose(out["w"], torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "sgd", "none"])
def test_state_dict_round_trip(kind: str) -> None:
    a = merging.get_server_opt(kind)
    x = {"p": torch.zeros(3), "q": torch.zeros(2, 2)}
    g = torch.Generator().manual_seed(0)
    steps = [
        {"p": torch.randn(3, generator=g), "q": torch.randn(2, 2, generator=g)} for _ in range(3)
    ]
    x = a.step(x, steps[0])
    x = a.step(x, steps[1])
    sd = a.state_dict()
    assert all(isinstance(v, int | torch.Tensor) and not isinstance(v, bool) for v in sd.values())
    assert sd["step"] == 2
    b = merging.get_server_opt(kind)
    b.load_state_dict(sd)
    xa, xb = a.step(x, steps[2]), b.step(x, steps[2])
    for k in x:
        assert torch.equal(xa[k], xb[k])
    with pytest.raises(ValueError, match="unexpected"):
        b.load_state_dict({"step": 1, "zz/p": torch.zeros(3)})
    with pytest.raises(ValueError, match="'step'"):
        b.load_state_dict({})


@pytest.mark.parametrize("opt_name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "none"])
def test_composes_with_every_merger(opt_name: str) -> None:
    g = torch.Generator().manual_seed(1)
    glob = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}
    deltas = [
        {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in glob.items()} for _ in range(4)
    ]
    for name in merging.names():
        opt = merging.get_server_opt(opt_name)
        merged = merging.aggregate(merging.get(name), deltas, [1, 2, 3, 4], key=5)
        new = opt.step(glob, merged)
        assert list(new) == list(glob)
        for k in glob:
            assert new[k].shape == glob[k].shape
            assert bool(torch.isfinite(new[k]).all())
        if opt_name == "none":
            for k in glob:
                assert torch.allclose(new[k], glob[k] + merged[k])
