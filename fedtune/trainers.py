"""Local trainers, registered by name and chosen by the ``trainer`` run-config key.

A trainer takes a model whose adapter holds the global state and a stream of batches, trains
in place and returns what the codec encodes: the dense delta ``Δ = θ_local − θ_global``
(first-order) or a :class:`~fedtune.codecs.ZOUpdate` of per-step scalars (zeroth-order). It
never sees Flower, the wire or attacks (those wrap it, see :mod:`fedtune.attacks`).

* ``first-order``: AdamW steps (Ferret, Shu et al. 2024: local first-order steps, then the
  codec projects the delta on seeded bases).
* ``zeroth-order``: MeZO steps (Malladi et al., NeurIPS 2023, Alg. 1): the model is only
  evaluated, never back-propagated; directions regenerate from the client's key so the server
  replays them from one scalar per step (FedKSeed, Qin et al., ICML 2024).

A new trainer is one file with ``@trainers.register("name")`` on a function of
:data:`Trainer`'s signature, named by ``trainer='name'`` (plus ``plugins=`` if it lives
outside fedtune).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedtune import adapters
from fedtune.registry import Registry

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalSpec:
    """The knobs of local training (from the run config, parsed once)."""

    steps: int
    lr: float
    lr_scale: float = 1.0  # this round's factor of the lr schedule (lr_scale())
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 16
    zo_eps: float = 1e-3


def lr_scale(schedule: str, server_round: int, num_rounds: int, final: float) -> float:
    """The client learning rate of ``server_round`` as a factor of ``lr``.

    ``'cosine'`` is the cosine annealing of Loshchilov & Hutter (ICLR 2017, eq. 5) without
    restarts, run over rounds: ``final + (1 - final) * (1 + cos(pi * (t - 1) / (R - 1))) / 2``,
    so round 1 trains at ``lr`` and round ``R`` at ``final * lr``. Each round's AdamW starts
    afresh (its moments do not survive the round), so without a schedule every round takes
    steps of the same size to the end; the decay lets the last rounds settle (issue 17, point 5).
    """
    if schedule == "constant" or num_rounds <= 1:
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"lr schedule must be 'constant' or 'cosine', got {schedule!r}")
    frac = min(max(server_round - 1, 0), num_rounds - 1) / (num_rounds - 1)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass
class LocalJob:
    """One client's local training in one round."""

    model: nn.Module
    batches: Iterator[Any]
    global_state: Mapping[str, torch.Tensor]
    spec: LocalSpec
    device: torch.device
    key: int  # the client-round key the server issued (zeroth-order directions)
    data_key: int  # batch order and dropout masks
    codec: Any  # the round's codec (a zeroth-order trainer reads its lr / scalar precision)


@dataclass
class LocalResult:
    update: Any  # dict[str, Tensor] delta, or a codec-specific update (ZOUpdate)
    metrics: dict[str, float]


Trainer = Callable[[LocalJob], LocalResult]
# a trainer is its own factory: the registry maps a name to the function that trains
REGISTRY: Registry[LocalResult] = Registry("trainer")
register = REGISTRY.register
names = REGISTRY.names
factory = REGISTRY.factory


def get(name: str) -> Trainer:
    return REGISTRY.factory(name)


@register("first-order")
def first_order(job: LocalJob) -> LocalResult:
    """AdamW on the trainable parameters, then ``Δ = θ_local − θ_global`` per tensor (fp32)."""
    from fedtune.train import train_local

    result = train_local(
        job.model,
        job.batches,
        steps=job.spec.steps,
        lr=job.spec.lr * job.spec.lr_scale,
        weight_decay=job.spec.weight_decay,
        grad_clip=job.spec.grad_clip,
        device=job.device,
        dropout_key=job.data_key,
    )
    new_state = adapters.trainable_state(job.model)
    delta = {k: new_state[k] - job.global_state[k] for k in job.global_state}
    return LocalResult(
        delta,
        {
            "train-loss": result.loss,
            "num-examples": float(result.num_examples),
            "local-steps": float(result.steps),
        },
    )


@register("zeroth-order")
def zeroth_order(job: LocalJob) -> LocalResult:
    """MeZO steps with the codec's learning rate and scalar precision; the update is the list
    of projected-gradient scalars (the directions are the server's to regenerate)."""
    from fedtune.codecs.spsa import ZOUpdate
    from fedtune.train import to_device
    from fedtune.zo import zo_train

    model = job.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.eval()  # both loss evaluations of a step must see the same function (no dropout)

    def loss_fn(batch: Any) -> float:
        return float(model(**to_device(batch, job.device)).loss)

    with torch.no_grad():
        scalars, losses = zo_train(
            params,
            loss_fn,
            job.batches,
            steps=job.spec.steps,
            lr=job.codec.lr,
            eps=job.spec.zo_eps,
            key=job.key,
            scalar_bits=job.codec.coef_bits,
        )
    return LocalResult(
        ZOUpdate(scalars, like=job.global_state),
        {
            "train-loss": sum(losses) / max(len(losses), 1),
            "num-examples": float(job.spec.steps * job.spec.batch_size),
            "local-steps": float(job.spec.steps),
        },
    )
