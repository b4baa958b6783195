"""Reload a finished causal-LM run's exported adapter with PEFT and check it (issue 9).

    FEDTUNE_CACHE=.cache python benchmarks/lm_reload.py runs/llm_lora_dense [--no-write]

Loads the base model fresh (``fedtune.lm.load_causal_lm``), attaches ``<run>/adapter`` with
``peft.PeftModel.from_pretrained``, recomputes the held-out answer loss on the run's own
held-out split and compares it with the last row of ``metrics.jsonl`` (the server's number),
then generates greedy answers to a few held-out prompts with the base model and with the
adapter. The report (per-round held-out loss, the drop, the reload check and the
generations) goes to ``docs/benchmarks.md`` (section ``lm-federated``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import write_section  # noqa: E402
from fedtune import pipeline  # noqa: E402
from fedtune.config import parse  # noqa: E402
from fedtune.evaluate import evaluate_lm  # noqa: E402
from fedtune.lm import generate_samples, load_causal_lm  # noqa: E402
from fedtune.train import collate_for, eval_batches  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    run = Path(args.run_dir)
    pipeline.quiet_libraries()
    cfg = parse(json.loads((run / "config.json").read_text()))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    fed = pipeline.federation(cfg)

    from peft import PeftModel

    base, tok = load_causal_lm(cfg.model)
    prompts = [str(p) for p in fed.test["prompt"][: args.prompts]]
    before = generate_samples(base, tok, prompts, 32)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    batches = eval_batches(
        fed.test, collate_for(cfg.task, tok, cfg.max_length), cfg.eval_batch_size
    )
    res = evaluate_lm(model, batches, pipeline.resolve_device(cfg.device))
    after = generate_samples(model, tok, prompts, 32)

    first, last = rows[0]["test-loss"], rows[-1]["test-loss"]
    drop = 1.0 - last / first
    lines = [
        "## Federated instruction tuning of SmolLM2-135M-Instruct (issue 9)",
        "",
        f"Run `{cfg.run_name}` (`FEDTUNE_CACHE=.cache python -m fedtune.launch -c "
        f"simulations/llm_{cfg.adapter}_{cfg.codec}.toml`): {len(fed.clients)} clients "
        f"({cfg.partitioning}, alpha {cfg.dirichlet_alpha}), {cfg.adapter} on `{cfg.target_modules}`, "
        f"codec `{cfg.codec}`, merger `{cfg.merger}`, {cfg.num_rounds} rounds x {cfg.local_steps} "
        f"local steps of batch {cfg.batch_size} at lr {cfg.lr}, max_length {cfg.max_length}; "
        f"held-out answer loss on {len(fed.test)} held-out pairs (prompt tokens masked).",
        "",
        "| round | held-out answer loss | perplexity | uplink B (all clients) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['test-loss']:.4f} | {r.get('test-perplexity', float('nan')):.2f} "
            f"| {r.get('bytes-up', 0):,} |"
        )
    lines += [
        "",
        f"Held-out answer loss {first:.4f} -> {last:.4f}: **{100 * drop:.1f}% lower** "
        f"(target: at least 30%).",
        "",
        f"Reload check (`benchmarks/lm_reload.py {run}`): a fresh base model + "
        f"`PeftModel.from_pretrained(base, '{run.name}/adapter')` gives held-out answer loss "
        f"{res['loss']:.4f} (server reported {last:.4f}; difference {abs(res['loss'] - last):.2e}).",
        "",
        "| held-out prompt | base model | with the federated adapter |",
        "|---|---|---|",
    ]
    for p, b, a in zip(prompts, before, after, strict=True):
        cells = [x.replace("|", "\\|").replace("\n", " ")[:120] for x in (p, b, a)]
        lines.append(f"| {cells[0]} | {cells[1]} | {cells[2]} |")
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        write_section("lm-federated", md)
    return 0 if abs(res["loss"] - last) < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
