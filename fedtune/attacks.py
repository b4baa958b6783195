"""Simulated malicious clients, as a wrapper around an honest trainer.

``attack`` / ``attack-fraction`` / ``attack-scale`` pick a keyed, fixed subset of clients
(:func:`fedtune.parts.attackers`); their trainer is wrapped in :class:`Attacked`, which
corrupts the honest update before it is encoded. Threat models: sign flip and scaling (Fang et
al., "Local Model Poisoning Attacks to Byzantine-Robust Federated Learning", USENIX Security
2020) and Gaussian noise (Blanchard et al., "Machine Learning with Adversaries", NeurIPS 2017).
"""

from __future__ import annotations

import torch

from fedtune import rng
from fedtune.trainers import LocalJob, LocalResult, Trainer

Tensors = dict[str, torch.Tensor]


def corrupt(delta: Tensors, how: str, scale: float, key: int) -> Tensors:
    """A malicious update: sign-flipped and scaled, scaled, or replaced by keyed noise of
    ``scale`` times the honest norm."""
    if how == "sign-flip":
        return {k: -scale * v for k, v in delta.items()}
    if how == "scale":
        return {k: scale * v for k, v in delta.items()}
    if how == "noise":
        norm = sum(float(v.pow(2).sum()) for v in delta.values()) ** 0.5
        out = {
            k: rng.normal(key, i, v.numel()).view_as(v) for i, (k, v) in enumerate(delta.items())
        }
        nn_ = sum(float(v.pow(2).sum()) for v in out.values()) ** 0.5 or 1.0
        return {k: v * (scale * norm / nn_) for k, v in out.items()}
    raise ValueError(f"unknown attack {how!r}")


class Attacked:
    """A trainer whose dense update is corrupted with :func:`corrupt` (keyed by the client's
    round key, so the attack is reproducible)."""

    def __init__(self, trainer: Trainer, how: str, scale: float) -> None:
        self.trainer, self.how, self.scale = trainer, how, scale

    def __call__(self, job: LocalJob) -> LocalResult:
        result = self.trainer(job)
        if not isinstance(result.update, dict):
            raise ValueError(
                f"attack={self.how!r} corrupts dense deltas; the trainer returned "
                f"{type(result.update).__name__}"
            )
        result.update = corrupt(result.update, self.how, self.scale, job.key)
        return result
