"""Zeroth-order training (fedtune.zo) and the spsa codec's replay."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedtune import codecs, rng, zo


def _net(seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def _batches(seed: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 3, generator=g)
    while True:
        x = torch.randn(32, 8, generator=g)
        yield x, torch.tanh(x @ w)


def _loss(net: torch.nn.Module):  # type: ignore[no-untyped-def]
    # elementwise MSE: cross_entropy's thread pool is pathologically slow on a loaded 2-core box
    return lambda b: ((net(b[0]) - b[1]) ** 2).mean()


@pytest.mark.parametrize("bits", [32, 16])
def test_spsa_replay_equals_client_update(bits: int) -> None:
    net = _net()
    state = dict(net.named_parameters())
    before = {n: p.detach().clone() for n, p in state.items()}
    key = rng.derive_key(42, 3, 1)
    codec = codecs.get("spsa", lr=0.05, coef_bits=bits)
    scalars, losses = zo.zo_train(
        state, _loss(net), _batches(), steps=25, lr=codec.lr, eps=1e-3, key=key, scalar_bits=bits
    )
    assert len(scalars) == len(losses) == 25
    payload = codec.encode(codecs.ZOUpdate(scalars, like=before), key, round=3, slot=1)
    assert len(payload) == 40 + 4 + 8 + 25 * bits // 8 + 4
    delta = codec.decode(payload, like=before, key=key, round=3, slot=1)
    for n, p in state.items():
        actual = p.detach() - before[n]
        assert float(actual.abs().max()) > 0
        torch.testing.assert_close(delta[n], actual, rtol=0, atol=2e-6)


def test_zo_is_deterministic_and_decreases_loss() -> None:
    key = rng.derive_key(7)
    runs = []
    for _ in range(2):
        net = _net()
        scalars, losses = zo.zo_train(
            list(net.parameters()), _loss(net), _batches(), steps=200, lr=0.02, eps=1e-3, key=key
        )
        runs.append((scalars, [p.detach().clone() for p in net.parameters()], losses))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    losses = runs[0][2]
    assert sum(losses[-40:]) / 40 < 0.5 * sum(losses[:40]) / 40


def test_zo_trains_a_tiny_hf_model_through_a_closure() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)  # test model init only
    model = transformers.LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train = {n: p for n, p in model.named_parameters() if "q_proj" in n}
    for p in train.values():
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in train.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    batches = [{"input_ids": ids, "labels": ids}] * 4
    key = rng.derive_key(1, 2, 3)
    codec = codecs.get("spsa", lr=1e-3)
    scalars, losses = zo.zo_train(
        train, lambda b: model(**b).loss, batches, steps=4, lr=1e-3, eps=1e-3, key=key
    )
    assert all(l > 0 for l in losses)  # noqa: E741
    delta = codec.decode(codec.encode(codecs.ZOUpdate(scalars, before), key), like=before)
    for n, p in train.items():
        torch.testing.assert_close(delta[n], p.detach() - before[n], rtol=0, atol=1e-6)


def test_direction_is_the_portable_normal() -> None:
    z = zo.direction(5, 3, 1, 100)
    assert torch.equal(z, rng.normal(rng.derive_key(5, 3), 1, 100))


def test_zo_and_spsa_errors() -> None:
    net = _net()
    params = list(net.parameters())
    with pytest.raises(ValueError, match="ran out"):
        zo.zo_train(params, _loss(net), [next(_batches())], steps=2, lr=0.1, eps=1e-3, key=1)
    with pytest.raises(ValueError, match="eps"):
        zo.zo_train(params, _loss(net), _batches(), steps=1, lr=0.1, eps=0.0, key=1)
    with pytest.raises(ValueError, match="scalar_bits"):
        zo.zo_train(params, _loss(net), _batches(), steps=1, lr=0.1, eps=1e-3, key=1, scalar_bits=8)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        zo.zo_train(params, lambda b: float("nan"), _batches(), steps=1, lr=0.1, eps=1e-3, key=1)
    codec = codecs.get("spsa", lr=0.1, coef_bits=16)
    like = dict(net.named_parameters())
    with pytest.raises(TypeError, match="ZOUpdate"):
        codec.encode(like, 1)
    with pytest.raises(ValueError, match="not exactly representable in fp16"):
        codec.encode(codecs.ZOUpdate([0.1], like), 1)
    with pytest.raises(ValueError, match="finite"):
        codec.encode(codecs.ZOUpdate([float("nan")], like), 1)
    # a callable batch source works too
    src = _batches()
    scalars, _ = zo.zo_train(
        params, _loss(net), lambda: next(src), steps=2, lr=0.1, eps=1e-3, key=1
    )
    assert len(scalars) == 2
