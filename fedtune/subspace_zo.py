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

import torch

from fedtune import rng, trainers
from fedtune.subspace import Session, SubspaceCodec, SubspaceUpdate, deferred

_DIR_TAG = 0x20D1  # separates the ZO directions' keys from every other draw of the client key


@trainers.register("subspace-zo")  # type: ignore[arg-type]  # Registry[Trainer] types factories
def subspace_zo_trainer(job: trainers.LocalJob) -> trainers.LocalResult:
    """Defers the ZO steps on ``z`` to ``codec.encode`` (which knows the round)."""
    return deferred(job, "subspace-zo", train_subspace_zo)


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
    ses = Session.begin(job, codec, server_round, z_grad=False)
    lay, z, head, opt = ses.basis.layout, ses.z, ses.head, ses.opt
    z.grad = torch.zeros(lay.k)
    eps = spec.zo_eps
    for n in lay.sub:  # no graph through the body: the forward passes are inference
        ses.params[n].requires_grad_(False)
    total, seen = 0.0, 0
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            for s in range(spec.steps):
                batch = to_device(next(job.batches), dev)
                u = direction(job.key, s, lay.k)
                mask_seed = rng.derive_key(job.data_key, s) & 0x7FFF_FFFF_FFFF_FFFF
                losses = []
                for sign in (1.0, -1.0):
                    ses.move_to(z + sign * eps * u)
                    torch.manual_seed(mask_seed)  # the same dropout masks for θ ± εu
                    loss = model(**batch).loss
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"training loss became {loss.item()}; lower lr")
                    if head:
                        (0.5 * loss).backward()  # the head's first-order gradient
                    losses.append(float(loss.detach()))
                z.grad = (losses[0] - losses[1]) / (2 * eps) * u
                if spec.grad_clip > 0 and head:
                    torch.nn.utils.clip_grad_norm_(head, spec.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=False)
                total += 0.5 * (losses[0] + losses[1])
                seen += int(batch["input_ids"].shape[0])
        ses.move_to(z)
    finally:
        for n in lay.sub:
            ses.params[n].requires_grad_(True)
    return ses.finish(job, metrics, total, seen)
