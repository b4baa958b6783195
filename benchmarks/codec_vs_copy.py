"""Quick side-by-side: encode+decode time of the O(d) codecs against a plain copy of Δ.

    OMP_NUM_THREADS=1 python benchmarks/codec_vs_copy.py [tensors] [k]

306 LoRA-shaped tensors of 32,768 values (d ≈ 1e7) by default, K = 65,536, best of 3 (copy)
or 2 (codecs), one process: the ratio is what to read on a shared machine (issue 4's "within
20x of the copy" target). The full benchmark with MSE and the Gaussian reference is
benchmarks/codecs.py.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtune import codecs, rng


def best(f: Callable[[], object], n: int) -> float:
    out = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        out = min(out, time.perf_counter() - t0)
    return out


def main(tensors: int = 306, k: int = 65536) -> None:
    delta = {f"t{i}": rng.normal(1, i, 32768) for i in range(tensors)}
    d = sum(v.numel() for v in delta.values())
    t_copy = best(lambda: {n: v.clone() for n, v in delta.items()}, 7)
    print(f"d = {d:,}, K = {k:,}, torch threads = {torch.get_num_threads()}")
    print(f"| codec | encode s | decode s | encode+decode ÷ copy ({t_copy:.4f} s) |")
    print("|---|---|---|---|")
    for name in ("countsketch", "srht"):
        c = codecs.get(name, k=k)
        payload = c.encode(delta, 7, round=1, slot=0)
        te = best(lambda c=c: c.encode(delta, 7, round=1, slot=0), 5)
        td = best(lambda c=c, p=payload: c.decode(p, like=delta, key=7, round=1, slot=0), 5)
        print(f"| {name} | {te:.3f} | {td:.3f} | {(te + td) / t_copy:.1f}x |")
    t_bits = best(lambda: rng.bits32(5, 1, d), 2)
    print(f"Philox bits32 for d values: {t_bits:.3f} s = {t_bits / t_copy:.1f}x copy")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
