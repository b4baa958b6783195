"""``subspace-zo``: zeroth-order training inside the round's seeded subspace (issue 17, point 3).

MeZO (Malladi et al., NeurIPS'23, Alg. 1) estimates a directional derivative from two forward
passes, ``g = (L(θ + εu) − L(θ − εu)) / 2ε``; its variance grows with the dimension of the
space ``u`` lives in, so on d = 74,883 LoRA parameters it needs thousands of steps per unit of
progress (fedtune's ``spsa`` codec stayed below the majority class). Here ``u ∈ R^K`` lives in
the round's subspace of :mod:`fedtune.subspace`: ``θ = θ_t + P_t z``, each step draws
``u_s ~ N(0, I_K)`` from the client-round key, evaluates ``L(θ_t + P_t(z ± εu_s))`` with the
same dropout masks, and feeds the estimate ``∇̂_z = g_s u_s`` to AdamW on ``z`` (ZO-AdaMM,
Chen et al., NeurIPS'19: Adam's per-coordinate normalisation makes one learning rate work
across K and ε). The variance of ``∇̂_z`` is ``O(K)``, not ``O(d)``.

With ``codec-head='dense'`` the small task head is trained first-order on the same two
forward passes (their losses' mean, backpropagated into the head only: the body's parameters
do not require gradients, so no backward pass runs through the transformer) and sent dense —
"first-order head + ZO body". The client never back-propagates through the body: memory and
compute are those of inference plus the head.

The payload is the ``subspace`` codec's (``z`` in ``codec-coef-bits``, the head in
``codec-head-bits``); the server reconstructs ``P_t z̄`` exactly as for the first-order
``subspace`` trainer. Use ``trainer='subspace-zo' codec='subspace'``; ``local-steps`` counts
ZO steps (two forward passes each), ``zo-eps`` is ε, ``codec-lr`` the AdamW rate of ``z``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedtune import rng, trainers
from fedtune.subspace import (
    PendingSubspace,
    SubspaceCodec,
    SubspaceUpdate,
    _flat,
    _set,
)

_DIR_TAG = 0x20D1  # separates the ZO directions' keys from every other draw of the client key


class PendingSubspaceZO(PendingSubspace):
    """Trained when the codec learns the round, like :class:`PendingSubspace`."""

    def run(self, codec: SubspaceCodec, server_round: int) -> SubspaceUpdate:
        if self.done is None:
            self.done = train_subspace_zo(self.job, codec, server_round, self.metrics)
        return self.done


@trainers.register("subspace-zo")  # type: ignore[arg-type]  # Registry[Trainer] types factories
def subspace_zo_trainer(job: trainers.LocalJob) -> trainers.LocalResult:
    """Defers the ZO steps on ``z`` to ``codec.encode`` (which knows the round)."""
    if not isinstance(job.codec, SubspaceCodec):
        raise TypeError(
            f"trainer 'subspace-zo' needs codec='subspace', got {type(job.codec).__name__}"
        )
    metrics = {
        "train-loss": math.nan,
        "num-examples": float(job.spec.steps * job.spec.batch_size),
        "local-steps": float(job.spec.steps),
    }
    return trainers.LocalResult(PendingSubspaceZO(job, metrics), metrics)


def direction(key: int, step: int, k: int) -> torch.Tensor:
    """``u_s ~ N(0, I_K)`` of step ``s`` (flat fp32; bit-identical on every device)."""
    return rng.normal(rng.derive_key(key, step, _DIR_TAG), 0, k)


def train_subspace_zo(
    job: trainers.LocalJob,
    codec: SubspaceCodec,
    server_round: int,
    metrics: dict[str, float] | None = None,
) -> SubspaceUpdate:
    """``spec.steps`` two-point ZO steps on ``z`` (AdamW), first-order steps on a dense head."""
    from fedtune.train import to_device

    model, spec, dev = job.model, job.spec, job.device
    like = {n: t.detach().to("cpu", torch.float32) for n, t in job.global_state.items()}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(like):
        raise ValueError("the model's trainable parameters do not match the global state")
    basis = codec.basis(like, server_round)
    lay = basis.layout
    theta0 = _flat(like, lay.sub)
    z = torch.zeros(lay.k)
    z.grad = torch.zeros(lay.k)
    head = [params[n] for n in lay.head]
    groups: list[dict[str, Any]] = [{"params": [z], "lr": codec.lr or spec.lr}]
    if head:
        groups.append({"params": head, "lr": codec.head_lr or spec.lr})
    opt = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    eps = spec.zo_eps
    for n in lay.sub:  # no graph through the body: the forward passes are inference
        params[n].requires_grad_(False)
    model.to(dev)
    model.train()
    total = 0.0
    seen = 0
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            for s in range(spec.steps):
                batch = to_device(next(job.batches), dev)
                u = direction(job.key, s, lay.k)
                mask_seed = rng.derive_key(job.data_key, s) & 0x7FFF_FFFF_FFFF_FFFF
                losses = []
                for sign in (1.0, -1.0):
                    _set(params, lay.sub, theta0 + basis.apply(z + sign * eps * u))
                    torch.manual_seed(mask_seed)  # the same dropout masks for θ ± εu
                    loss = model(**batch).loss
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"training loss became {loss.item()}; lower lr")
                    if head:
                        (0.5 * loss).backward()  # the head's first-order gradient
                    losses.append(float(loss.detach()))
                g = (losses[0] - losses[1]) / (2 * eps)
                z.grad = g * u
                if spec.grad_clip > 0 and head:
                    torch.nn.utils.clip_grad_norm_(head, spec.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=False)
                total += 0.5 * (losses[0] + losses[1])
                seen += int(batch["input_ids"].shape[0])
        _set(params, lay.sub, theta0 + basis.apply(z))
    finally:
        for n in lay.sub:
            params[n].requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model.eval()
    if metrics is not None:
        metrics["train-loss"] = total / spec.steps if spec.steps else math.nan
        metrics["num-examples"] = float(seen)
    head_delta = {n: params[n].detach().to("cpu", torch.float32) - like[n] for n in lay.head}
    return SubspaceUpdate(z.detach().clone(), head_delta, like)
