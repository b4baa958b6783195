"""Zeroth-order local training (MeZO / FedKSeed): the update is a list of scalars.

MeZO (Malladi et al., NeurIPS'23, Alg. 1): at step s draw ``z_s ~ N(0, I)`` from a seed,
evaluate ``ℓ± = L(θ ± εz_s)`` on one batch, set the projected gradient
``g_s = (ℓ₊ − ℓ₋)/(2ε)`` and update ``θ ← θ − η g_s z_s``. FedKSeed (Qin et al., ICML'24)
sends only the ``g_s``: the server regenerates every ``z_s`` and replays
``Δ = Σ_s −η g_s z_s`` (:class:`fedtune.codecs.spsa.SpsaCodec`).

Here ``z_s`` for trainable tensor ``i`` is ``rng.normal(derive_key(key, s), stream=i,
n=numel)``, bit-identical on every device, so the server's replay matches the client's
trajectory. Two choices make the replay match to float rounding:

* the step is applied as ``θ.add_(z, alpha=a_s)`` with ``a_s = float32(−η g_s)``
  (:func:`step_coef`), the same operation the decoder uses;
* parameters are restored from a copy after each perturbation, not by subtracting ``εz``
  (which drifts by an ulp per step in float32). Memory: one copy of the trainable
  parameters plus one step's ``z`` (adapters are small; ``z`` is never kept across steps).

``scalar_bits=16`` rounds ``g_s`` to fp16 *before* the client applies it, so an fp16 payload
still replays the client's exact trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedtune import rng

LossFn = Callable[[Any], "float | torch.Tensor"]


def direction(
    key: int, step: int, index: int, numel: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The perturbation ``z`` of trainable tensor ``index`` at ``step`` (flat float32)."""
    return rng.normal(rng.derive_key(key, step), index, numel, device=device)


def round_scalar(g: float, bits: int) -> float:
    """``g`` rounded to the wire dtype (fp32 or fp16)."""
    if bits == 32:
        return float(np.float32(g))
    if bits == 16:
        return float(np.float16(g))
    raise ValueError(f"scalar_bits must be 32 or 16, got {bits!r}")


def step_coef(lr: float, g: float) -> float:
    """``float32(−lr·g)``: the exact multiplier of ``z_s`` used by client and server."""
    return float(np.float32(-lr * g))


def _as_list(params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    ps = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not ps:
        raise ValueError("zo_train needs at least one trainable tensor")
    for i, p in enumerate(ps):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"params[{i}] must be a floating-point tensor")
    return ps


def _batch_source(batches: Iterable[Any] | Callable[[], Any]) -> Callable[[], Any]:
    if isinstance(batches, Iterable):
        it: Iterator[Any] = iter(batches)

        def nxt() -> Any:
            try:
                return next(it)
            except StopIteration:
                raise ValueError("zo_train: batches ran out before `steps` steps") from None

        return nxt
    if callable(batches):
        return batches
    raise TypeError("batches must be an iterable of batches or a callable returning one")


@torch.no_grad()
def zo_train(
    params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    batches: Iterable[Any] | Callable[[], Any],
    *,
    steps: int,
    lr: float,
    eps: float,
    key: int,
    scalar_bits: int = 32,
    start_step: int = 0,
) -> tuple[list[float], list[float]]:
    """Run ``steps`` MeZO steps in place; return (projected-gradient scalars, losses).

    params: the trainable tensors, in the order of the adapter's ``trainable_state`` (a
      dict keeps that order explicit); they are modified in place.
    loss_fn: ``loss_fn(batch) -> loss`` on the current parameters, e.g.
      ``lambda b: model(**b).loss`` (called twice per step under ``torch.no_grad``).
    batches: iterable of batches or a zero-argument callable returning the next one.
    key: the client-round key issued by the server; step s uses ``derive_key(key, s)``.
    scalar_bits: 32 or 16, the precision the scalars are sent with (applied locally too).
    start_step: index of the first step (to continue a trajectory across calls).
    Returns ``(scalars, losses)`` with ``losses[s] = (ℓ₊ + ℓ₋)/2``.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    if not math.isfinite(lr):
        raise ValueError(f"lr must be finite, got {lr!r}")
    round_scalar(0.0, scalar_bits)
    ps = _as_list(params)
    next_batch = _batch_source(batches)
    scalars: list[float] = []
    losses: list[float] = []
    for s in range(start_step, start_step + steps):
        batch = next_batch()
        zs = [direction(key, s, i, p.numel(), p.device).view(p.shape) for i, p in enumerate(ps)]
        backup = [p.detach().clone() for p in ps]
        for p, z in zip(ps, zs, strict=True):
            p.add_(z, alpha=eps)
        loss_plus = float(loss_fn(batch))
        for p, b, z in zip(ps, backup, zs, strict=True):
            p.copy_(b).add_(z, alpha=-eps)
        loss_minus = float(loss_fn(batch))
        if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
            for p, b in zip(ps, backup, strict=True):
                p.copy_(b)
            raise FloatingPointError(f"zo_train: non-finite loss at step {s}")
        g = round_scalar((loss_plus - loss_minus) / (2 * eps), scalar_bits)
        if not math.isfinite(g):
            for p, b in zip(ps, backup, strict=True):
                p.copy_(b)
            raise FloatingPointError(f"zo_train: projected gradient overflows fp{scalar_bits}")
        a = step_coef(lr, g)
        for p, b, z in zip(ps, backup, zs, strict=True):
            p.copy_(b).add_(z, alpha=a)
        scalars.append(g)
        losses.append((loss_plus + loss_minus) / 2)
    return scalars, losses
