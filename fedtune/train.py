"""The explicit local training loop (first-order, AdamW) and batch iteration.

Written out in full on purpose (torchtune / nanoGPT style): a client round is
``for step in range(steps): loss = model(**batch).loss; loss.backward(); clip; opt.step()``.
The zeroth-order (MeZO / FedKSeed) loop lives in :mod:`fedtune.zo`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from fedtune import rng

Batch = dict[str, torch.Tensor]


@dataclass
class TrainResult:
    """What a client reports about its local round."""

    loss: float  # mean training loss over the local steps
    steps: int
    num_examples: int  # examples seen (steps x batch size); the FedAvg weight


Columns = dict[str, list[Any]]  # a slice of a datasets.Dataset: column -> values
Collate = Callable[[Columns], Batch]


def classification_collate(tokenizer: Any, max_length: int) -> Collate:
    """Tokenize the columns {text, label} of a slice into one padded batch."""

    def collate(cols: Columns) -> Batch:
        enc = tokenizer(
            list(cols["text"]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([int(v) for v in cols["label"]], dtype=torch.long)
        return dict(enc)

    return collate


def collate_for(task: str, tokenizer: Any, max_length: int) -> Collate:
    """The collate function of ``task``."""
    if task == "classification":
        return classification_collate(tokenizer, max_length)
    from fedtune.data import chat

    return chat.make_collate(tokenizer, max_length)


def shuffled_batches(ds: Dataset, collate: Collate, batch_size: int, key: int) -> Iterator[Batch]:
    """Endless keyed shuffles of ``ds`` in batches (a new permutation each epoch)."""
    n = len(ds)
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    epoch = 0
    while True:
        order = torch.argsort(rng.uniform(key, epoch, n), stable=True).tolist()
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield collate(ds[idx])
        epoch += 1


def eval_batches(ds: Dataset, collate: Collate, batch_size: int) -> Iterator[Batch]:
    """``ds`` in order, in batches (one pass)."""
    for i in range(0, len(ds), batch_size):
        yield collate(ds[i : i + batch_size])


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def train_local(
    model: nn.Module,
    batches: Iterator[Batch],
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    device: torch.device,
    dropout_key: int,
) -> TrainResult:
    """``steps`` AdamW steps on the trainable parameters of ``model``.

    Dropout masks come from torch's RNG; we fork it and seed the fork from ``dropout_key``
    so a client's round is reproducible (resume bit-identity) without touching the
    caller's global RNG state. Nothing drawn here must match on another device.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.to(device)
    model.train()
    total, seen = 0.0, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(dropout_key & 0x7FFF_FFFF_FFFF_FFFF)
        for _ in range(steps):
            batch = to_device(next(batches), device)
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            total += loss.item()
            seen += int(batch["input_ids"].shape[0])
    model.eval()
    return TrainResult(loss=total / steps if steps else math.nan, steps=steps, num_examples=seen)
