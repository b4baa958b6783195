"""``subspace-zo`` (fedtune/subspace_zo.py): zeroth-order steps inside the round's subspace,
first-order dense head. Deterministic, forward-only through the body, and it learns."""

from __future__ import annotations

import itertools
import json

import torch

from fedtune import adapters, parts, pipeline, subspace_zo, trainers
from fedtune.simulate import build_config
from fedtune.train import collate_for, shuffled_batches


def _cfg(tiny_run_config, **over):
    rc = {**tiny_run_config, "codec": "subspace", "codec-k": 32, "codec-head": "dense",
          "codec-lr": 1e-2, "local-steps": 40, "zo-eps": 1e-2, **over}  # fmt: skip
    items = [" ".join(f"{k}={json.dumps(v)}" for k, v in rc.items())]
    return build_config([*items, "trainer='subspace-zo'"])


def _job(cfg):
    """A job that trains on one fixed batch, from the keyed initial state."""
    fed = pipeline.federation(cfg)
    wb = pipeline.workbench(cfg, fed)
    adapters.load_trainable_state(wb.model, wb.initial)
    collate = collate_for(cfg.task, wb.tokenizer, cfg.max_length)
    batch = next(shuffled_batches(fed.client(0), collate, 16, 3))
    job = trainers.LocalJob(
        wb.model, itertools.repeat(batch), wb.initial, pipeline.local_spec(cfg), wb.device,
        7, 11, pipeline.codec(cfg),
    )  # fmt: skip
    return job, batch


def _loss(model, batch) -> float:
    with torch.no_grad():
        model.eval()  # no dropout: the same loss twice
        return float(model(**batch).loss)


def test_registered_and_chosen_by_the_trainer_key(tiny_run_config):
    cfg = _cfg(tiny_run_config)
    assert "subspace-zo" in trainers.names()
    assert parts.trainer_name(cfg) == "subspace-zo"


def test_deterministic_forward_only_in_the_subspace_and_the_loss_falls(tiny_run_config):
    cfg = _cfg(tiny_run_config)
    job, batch = _job(cfg)
    model, codec = job.model, job.codec
    before = _loss(model, batch)
    seen_grads: list[str] = []
    lay = codec.layout(job.global_state)
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p, n=n: seen_grads.append(n))
        for n, p in model.named_parameters()
        if n in lay.sub
    ]
    a = subspace_zo.train_subspace_zo(job, codec, server_round=1)
    for h in hooks:
        h.remove()
    assert not seen_grads, f"a backward pass reached the body: {seen_grads[:3]}"
    assert all(p.requires_grad for n, p in model.named_parameters() if n in lay.sub)
    after = _loss(model, batch)
    assert after < before - 1e-3, (before, after)
    # the same keys give the same z and head, bit for bit
    job2, _ = _job(cfg)
    b = subspace_zo.train_subspace_zo(job2, codec, server_round=1)
    assert torch.equal(a.z, b.z) and a.head and set(a.head) == set(lay.head)
    assert all(torch.equal(a.head[n], b.head[n]) for n in a.head)
    # the model ends at θ_t + P_t z: what the server reconstructs from the payload
    payload = codec.encode(a, key=7, round=1, slot=0)
    out = codec.decode(payload, job.global_state, key=7, round=1, slot=0)
    state = adapters.trainable_state(model)
    for n in lay.sub:
        torch.testing.assert_close(state[n] - job.global_state[n], out[n], rtol=0, atol=1e-6)
    assert sum(float(out[n].norm()) for n in lay.sub) > 0
