"""Smoke benchmark of the causal-LM path: LoRA on SmolLM2-135M-Instruct, chatterbot English.

Held-out ANSWER loss (prompt tokens masked, :func:`fedtune.lm.answer_loss`) before and after
``--steps`` AdamW steps of PEFT LoRA (r=8 on q,k,v,o,gate,up,down) on CPU fp32, plus greedy
replies to a few held-out prompts. The held-out split and the batches are drawn from
:mod:`fedtune.rng`, so every run sees the same data.

    python benchmarks/lm_smoke.py            # ~2-4 min on 2 shared CPU cores
    python benchmarks/lm_smoke.py --no-write # print only

Writes the ``lm_smoke`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section
from fedtune import rng
from fedtune.adapters.lora import LoRA
from fedtune.data.chat import chat_collator, load_chatterbot, tokenize_chat
from fedtune.lm import answer_loss, generate_samples, load_causal_lm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = load_causal_lm("smollm2")
    t_load = time.perf_counter() - t0

    data = load_chatterbot(languages=("english",))
    n = len(data)
    key = rng.derive_key(args.seed, 0x11)
    held = sorted(rng.choice(key, 0, n, args.held_out).tolist())
    held_set = set(held)
    train = [i for i in range(n) if i not in held_set]
    feats = [
        tokenize_chat(tok, data[i]["prompt"], data[i]["response"], args.max_length)
        for i in range(n)
    ]
    collate = chat_collator(tok)
    bs = args.batch_size
    eval_batches = [collate([feats[i] for i in held[s : s + bs]]) for s in range(0, len(held), bs)]

    model = LoRA(
        r=args.rank, alpha=2.0 * args.rank, target_modules=TARGETS, task="causal-lm"
    ).attach(model, rng.derive_key(args.seed, 0x12))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    probe = [data[i]["prompt"] for i in held[:3]]
    before = answer_loss(model, eval_batches)
    print(f"[{time.perf_counter() - t0:6.0f}s] before: held-out answer loss {before['loss']:.3f}")
    samples_before = generate_samples(model, tok, probe, max_new_tokens=24)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    t1 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        idx = rng.choice(key, 1 + step, len(train), bs).tolist()
        batch = collate([feats[train[i]] for i in idx])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 5 == 4 or step == args.steps - 1:
            print(
                f"[{time.perf_counter() - t0:6.0f}s] step {step + 1:3d}  train answer loss "
                f"{sum(losses[-5:]) / len(losses[-5:]):.3f}"
            )
    t_train = time.perf_counter() - t1

    after = answer_loss(model, eval_batches)
    samples_after = generate_samples(model, tok, probe, max_new_tokens=24)
    drop = 1.0 - after["loss"] / before["loss"]

    rows = [
        "| held-out answer loss | before | after | drop |",
        "|---|---|---|---|",
        f"| loss (ppl) | {before['loss']:.3f} ({before['perplexity']:.1f}) | "
        f"{after['loss']:.3f} ({after['perplexity']:.1f}) | **{100 * drop:.1f}%** |",
    ]
    md = "\n".join(
        [
            "## Causal-LM smoke: LoRA on SmolLM2-135M-Instruct (chatterbot English)",
            "",
            f"`python benchmarks/lm_smoke.py` — CPU fp32, {args.threads} threads; "
            f"{len(train)} train / {len(held)} held-out pairs "
            f"({int(before['tokens'])} held-out answer tokens); LoRA r={args.rank} on "
            f"{','.join(t.removesuffix('_proj') for t in TARGETS)} ({trainable:,} trainable); "
            f"AdamW lr {args.lr:g}, {args.steps} steps x batch {bs}, max_length "
            f"{args.max_length}; loss on answer tokens only (prompt masked).",
            "",
            *rows,
            "",
            f"Load (cached fp32 copy) {t_load:.1f} s; training {t_train:.1f} s "
            f"({t_train / max(1, args.steps):.2f} s/step on a shared machine: compare ratios, "
            "not absolute times).",
            "",
            "| held-out prompt | before | after |",
            "|---|---|---|",
            *[
                f"| {_cell(p)} | {_cell(b)} | {_cell(a)} |"
                for p, b, a in zip(probe, samples_before, samples_after, strict=True)
            ],
        ]
    )
    print(md)
    if not args.no_write:
        write_section("lm_smoke", md)


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")[:120]


if __name__ == "__main__":
    main()
