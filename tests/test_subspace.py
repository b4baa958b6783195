"""The ``subspace`` codec + trainer (fedtune/subspace.py): exact reconstruction, adjoint,
exact averaging, wire checks, and a 2-round in-process simulation."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune import codecs, parts, subspace  # noqa: F401  (parts registers subspace)
from fedtune.codecs import PayloadError


def _like(head: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    like = {
        "l0.lora_A.weight": torch.randn(8, 96, generator=g),
        "l0.lora_B.weight": torch.randn(96, 8, generator=g),
        "l1.lora_A.weight": torch.randn(8, 50, generator=g),
    }
    if head:
        like["classifier.weight"] = torch.randn(3, 40, generator=g)
        like["classifier.bias"] = torch.randn(3, generator=g)
    return like


def _z(codec: subspace.SubspaceCodec, like, seed: int) -> torch.Tensor:
    return torch.randn(codec.layout(like).k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head", ["subspace", "dense", "frozen"])
def test_update_reconstructs_exactly(head):
    like = _like()
    c = subspace.SubspaceCodec(k=64, head=head, head_bits=32)
    z = _z(c, like, 1)
    hd = {n: torch.randn(like[n].shape) for n in c.layout(like).head}
    payload = c.encode(subspace.SubspaceUpdate(z, hd, like), key=5, round=3, slot=1)
    out = c.decode(payload, like, key=5, round=3, slot=1)
    lay = c.layout(like)
    pz = c.basis(like, 3).apply(z)
    got = torch.cat([out[n].reshape(-1) for n in lay.sub])
    torch.testing.assert_close(got, pz, rtol=0, atol=0)  # same fp32 operations: bit-equal
    for n in lay.head:
        torch.testing.assert_close(out[n], hd[n], rtol=0, atol=0)
    for n in lay.frozen:
        assert not out[n].any()
    assert len(payload) < 4 * 64 + 200 + (4 * 123 if head == "dense" else 0)


def test_dense_delta_in_the_subspace_is_recovered():
    """A dense delta P z on power-of-two blocks: encode finds z again (least squares)."""
    like = {"a.weight": torch.zeros(16, 32), "b.weight": torch.zeros(32, 16)}  # d = 1024
    c = subspace.SubspaceCodec(k=128)
    z = _z(c, like, 2)
    pz = c.basis(like, 4).apply(z)
    delta = {"a.weight": pz[:512].view(16, 32), "b.weight": pz[512:].view(32, 16)}
    out = c.decode(c.encode(delta, key=1, round=4, slot=0), like)
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in out.values()]), pz)


def test_adjoint_is_the_transpose():
    like = _like()
    c = subspace.SubspaceCodec(k=96)
    b = c.basis(like, 7)
    z = _z(c, like, 3)
    v = torch.randn(b.layout.d, generator=torch.Generator().manual_seed(4))
    lhs = float(torch.dot(b.apply(z).double(), v.double()))
    rhs = float(torch.dot(z.double(), b.adjoint(v).double()))
    assert lhs == pytest.approx(rhs, rel=1e-5)
    # and column by column: P e_k against Pᵀ
    cols = torch.stack([b.apply(torch.eye(b.layout.k)[k]) for k in range(b.layout.k)], 1)
    rows = torch.stack([b.adjoint(torch.eye(b.layout.d)[i]) for i in range(b.layout.d)], 0)
    torch.testing.assert_close(cols, rows, atol=1e-6, rtol=1e-5)


def test_averaging_z_equals_averaging_reconstructions():
    like = _like()
    c = subspace.SubspaceCodec(k=64, coef_bits=32)
    zs = [_z(c, like, s) for s in range(4)]
    w = torch.tensor([3.0, 1.0, 2.0, 5.0])
    recs = []
    for j, z in enumerate(zs):  # every client of round 2 shares the basis
        p = c.encode(subspace.SubspaceUpdate(z, {}, like), key=100 + j, round=2, slot=j)
        d = c.decode(p, like, key=100 + j, round=2, slot=j)
        recs.append(torch.cat([d[n].reshape(-1) for n in c.layout(like).sub]))
    mean_rec = sum(wi * r for wi, r in zip(w, recs, strict=True)) / w.sum()
    mean_z = sum(wi * z for wi, z in zip(w, zs, strict=True)) / w.sum()
    torch.testing.assert_close(mean_rec, c.basis(like, 2).apply(mean_z), atol=1e-5, rtol=1e-5)


def test_basis_is_shared_per_round_and_fresh_across_rounds():
    like = _like()
    c = subspace.SubspaceCodec(k=64, seed=9)
    z = _z(c, like, 0)
    a, b = c.basis(like, 1).apply(z), c.basis(like, 1).apply(z)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c.basis(like, 2).apply(z))
    assert not torch.allclose(a, subspace.SubspaceCodec(k=64, seed=10).basis(like, 1).apply(z))


def test_wire_checks():
    like = _like()
    c = subspace.SubspaceCodec(k=64, coef_bits=16, head="dense")
    hd = {n: torch.ones(like[n].shape) for n in c.layout(like).head}
    p = c.encode(subspace.SubspaceUpdate(_z(c, like, 0), hd, like), key=3, round=1, slot=0)
    with pytest.raises(PayloadError, match="round"):
        c.decode(p, like, round=2)
    with pytest.raises(PayloadError, match="key"):
        c.decode(p, like, key=4)
    with pytest.raises(PayloadError, match="layout"):  # a server configured with another k
        subspace.SubspaceCodec(k=32, coef_bits=16, head="dense").decode(p, like)
    bad = bytearray(p)
    bad[60] ^= 1
    with pytest.raises(PayloadError, match="CRC"):
        c.decode(bytes(bad), like)


def test_registered_and_validated():
    assert "subspace" in codecs.names()
    assert codecs.get("subspace", k=32).zeroth_order is False
    from fedtune import trainers

    assert "subspace" in trainers.names()


def test_two_round_simulation(tiny_run_config):
    from fedtune.simulate import Simulation, build_config

    rc = {
        **tiny_run_config,
        "codec": "subspace",
        "codec-k": 64,
        "codec-coef-bits": 16,
        "codec-head": "dense",
        "run-name": "sub",
    }
    items = [" ".join(f"{k}={json.dumps(v)}" for k, v in rc.items())]
    sim = Simulation(build_config([*items, "trainer='subspace'"]), echo=lambda s: None)
    assert sim.cfg.trainer == "subspace"
    initial = sim.wb.initial
    state = sim.run()
    rows = [json.loads(x) for x in (sim.folder.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["bytes-up"] > 0 for r in rows[1:])
    assert rows[1]["train-loss"] is not None
    moved = sum(float((state[n] - initial[n]).norm()) for n in state)
    assert moved > 0
    # each client-round payload: 64 fp16 coordinates + the dense fp16 head, far below dense
    dense = 4 * sum(t.numel() for t in initial.values())
    per = rows[1]["bytes-up"] / rows[1]["valid-replies"]
    assert per < dense / 4
