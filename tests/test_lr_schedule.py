"""``lr-schedule`` (fedtune/trainers.py: lr_scale): the client learning rate over rounds, as the
first-order and subspace trainers see it; refused where the server replays one lr."""

from __future__ import annotations

import itertools
import math

import pytest

from fedtune import parts, pipeline, trainers
from fedtune.config import ConfigError, parse


@pytest.mark.parametrize("final", [0.0, 0.1, 0.5, 1.0])
def test_cosine_runs_from_lr_to_final_and_never_rises(final):
    scales = [trainers.lr_scale("cosine", t, 20, final) for t in range(1, 21)]
    assert scales[0] == pytest.approx(1.0)
    assert scales[-1] == pytest.approx(final)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(scales))
    # the half-way round is the mean of the two ends (cos(pi/2) = 0)
    mid = trainers.lr_scale("cosine", 1, 3, final), trainers.lr_scale("cosine", 2, 3, final)
    assert mid[1] == pytest.approx((1.0 + final) / 2)
    assert mid[0] == pytest.approx(1.0)


def test_constant_and_single_round_are_one():
    assert trainers.lr_scale("constant", 7, 20, 0.1) == 1.0
    assert trainers.lr_scale("cosine", 1, 1, 0.1) == 1.0
    with pytest.raises(ValueError, match="lr schedule"):
        trainers.lr_scale("linear", 1, 5, 0.1)


def test_local_spec_carries_the_round_s_factor():
    cfg = parse({"lr-schedule": "cosine", "lr-final": 0.2, "num-rounds": 5, "lr": 1e-2})
    first, last = pipeline.local_spec(cfg, 1), pipeline.local_spec(cfg, 5)
    assert first.lr == last.lr == 1e-2
    assert first.lr_scale == pytest.approx(1.0) and last.lr_scale == pytest.approx(0.2)
    mid = pipeline.local_spec(cfg, 3).lr_scale
    assert mid == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_the_schedule_reaches_the_optimizer(tiny_run_config, monkeypatch):
    """What AdamW is built with in round t is lr x lr_scale(t): for the dense trainer through
    train_local, for the subspace trainer in both of its parameter groups."""
    import fedtune.train as train_mod

    seen: list[float] = []
    real = train_mod.train_local

    def spy(*a, **kw):
        seen.append(kw["lr"])
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "train_local", spy)
    rc = {**tiny_run_config, "local-steps": 1, "lr": 1e-2, "lr-schedule": "cosine",
          "lr-final": 0.25, "num-rounds": 3}  # fmt: skip
    cfg = parts.load_config(rc)
    wb = pipeline.workbench(cfg, pipeline.federation(cfg))
    for t in (1, 3):
        pipeline.client_round(cfg, 0, dict(wb.initial), key=5, server_round=t, slot=0)
    assert seen == pytest.approx([1e-2, 2.5e-3])


def test_subspace_groups_are_scaled(tiny_run_config):
    from fedtune import subspace

    rc = {**tiny_run_config, "codec": "subspace", "trainer": "subspace", "codec-k": 32,
          "codec-head": "dense", "codec-lr": 4e-2, "codec-head-lr": 2e-2, "lr-schedule": "cosine", "lr-final": 0.5,
          "num-rounds": 2}  # fmt: skip
    cfg = parts.load_config(rc)
    fed = pipeline.federation(cfg)
    wb = pipeline.workbench(cfg, fed)
    codec = pipeline.codec(cfg)
    job = trainers.LocalJob(wb.model, iter(()), dict(wb.initial), pipeline.local_spec(cfg, 2),
                            wb.device, 7, 11, codec)  # fmt: skip
    s = subspace.Session.begin(job, codec, 2, z_grad=True)
    lrs = [g["lr"] for g in s.opt.param_groups]
    assert lrs == pytest.approx([2e-2, 1e-2])  # z, then the dense head


def test_refused_for_the_zeroth_order_trainer():
    with pytest.raises(ConfigError, match="lr-schedule"):
        parts.load_config({"codec": "spsa", "lr-schedule": "cosine"})


def test_lr_final_is_a_fraction():
    with pytest.raises(ConfigError, match="lr-final"):
        parse({"lr-final": 1.5})
