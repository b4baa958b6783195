"""Held-out evaluation: accuracy and loss (classification), answer loss / perplexity (causal LM)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from fedtune.train import Batch, to_device


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, batches: Iterable[Batch], device: torch.device
) -> dict[str, float]:
    """Example-weighted mean cross-entropy and accuracy."""
    model.to(device)
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for batch in batches:
        batch = to_device(batch, device)
        out = model(**batch)
        labels = batch["labels"]
        k = int(labels.shape[0])
        loss_sum += float(out.loss) * k
        correct += int((out.logits.argmax(-1) == labels).sum())
        n += k
    if n == 0:
        raise ValueError("evaluation set is empty")
    return {"loss": loss_sum / n, "accuracy": correct / n, "num-examples": float(n)}


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, batches: Iterable[Batch], device: torch.device
) -> dict[str, float]:
    """Answer-token loss and perplexity (labels == -100 are prompt tokens and ignored)."""
    model.to(device)
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # next-token prediction: position t predicts token t+1
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        shift_labels = batch["labels"][:, 1:].reshape(-1)
        mask = shift_labels != -100
        if mask.any():
            loss_sum += float(
                torch.nn.functional.cross_entropy(
                    shift_logits[mask], shift_labels[mask], reduction="sum"
                )
            )
            tokens += int(mask.sum())
    if tokens == 0:
        raise ValueError("evaluation set has no answer tokens")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num-examples": float(tokens)}
