"""Causal language models for chat fine-tuning: answer-only evaluation and greedy samples.

Loading (offline, with the SmolLM2 fp32 cache) and the tiny test model live in
:mod:`fedtune.lm_loader`, which :mod:`fedtune.models` also uses; their public names
(:func:`load_causal_lm`, :func:`load_tokenizer`, :func:`tiny_llama`, :func:`byte_tokenizer`,
:class:`ModelLoadError`, the cache helpers and templates) are re-exported here, so
``from fedtune.lm import load_causal_lm`` keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedtune.data.chat import IGNORE_INDEX, chat_prompt_text
from fedtune.lm_loader import (
    CHATML_TEMPLATE,
    FALLBACK_TEMPLATE,
    SMOLLM2,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    TINY_LLAMA,
    ModelLoadError,
    byte_tokenizer,
    default_cache_dir,
    ensure_smollm2_cache,
    load_causal_lm,
    load_tokenizer,
    prepare_tokenizer,
    smollm2_cache_path,
    tiny_llama,
)

__all__ = [
    "CHATML_TEMPLATE",
    "FALLBACK_TEMPLATE",
    "SMOLLM2",
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "TINY_LLAMA",
    "ModelLoadError",
    "answer_loss",
    "byte_tokenizer",
    "default_cache_dir",
    "ensure_smollm2_cache",
    "generate_samples",
    "load_causal_lm",
    "load_tokenizer",
    "prepare_tokenizer",
    "smollm2_cache_path",
    "tiny_llama",
]


# ---------------------------------------------------------------------- evaluation


def answer_loss(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean next-token cross-entropy over answer tokens (``labels != -100``).

    Token-weighted over all batches: ``loss = sum_t CE_t / n`` with n the number of
    predicted answer tokens (label at position t+1 predicted from logits at t, as in
    ``model(**batch).loss``), so a batch with more answer tokens counts more. Returns
    ``{"loss", "perplexity" (= exp(loss)), "tokens"}``. Runs in eval mode without gradients
    and restores the model's previous mode.
    """
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                labels = batch["labels"].to(device)
                logits = model(
                    input_ids=ids, attention_mask=None if mask is None else mask.to(device)
                ).logits
                target = labels[:, 1:]
                pred = logits[:, :-1].float()
                total += F.cross_entropy(
                    pred.reshape(-1, pred.shape[-1]),
                    target.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                ).item()
                count += int((target != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("answer_loss: no answer tokens (every label is -100)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def generate_samples(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> list[str]:
    """Greedy replies to ``prompts`` (each rendered as a user turn with the chat template).

    Batches are left-padded; only the new tokens are decoded, without special tokens.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; load it with fedtune.lm (sets one)")
    device = next(model.parameters()).device
    generator: Any = model  # a PreTrainedModel or PeftModel; nn.Module has no .generate
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [
                list(
                    tokenizer(chat_prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]
                )
                for p in prompts[start : start + batch_size]
            ]
            width = max(len(r) for r in rows)
            ids = torch.tensor(
                [[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=device
            )
            mask = torch.tensor(
                [[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device
            )
            with torch.no_grad():
                gen = generator.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            for row in gen[:, width:]:
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out
