"""Codec benchmark: encode+decode time and MSE of every codec, side by side, in one run.

For d in {1e5, 1e6, 1e7} (``--quick``: {1e4, 1e5}) builds a LoRA-like update (tensors of
16x2048 / 2048x16 with log-normal norms), uses the default budget K = clamp(d/64, 4096,
65536), and measures for each codec: payload bytes, encode+decode wall time (best of a few
repeats), measured MSE/‖Δ‖² over several keys and the exact theory. ``gaussian`` and
``rademacher`` cost O(K·d); where K·d is too large they are timed at a reduced budget K' and
the time is extrapolated linearly to K (marked ``*``), their MSE is then measured at K'.
Ratios are against ``gaussian`` at the same K and against a plain copy of Δ.

Run: ``python benchmarks/codecs.py [--quick] [--no-write]``; writes the ``codecs`` section
of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section  # noqa: E402
from fedtune import codecs, rng  # noqa: E402
from fedtune.codecs.projection import ProjectionCodec, default_k  # noqa: E402

DENSE_O_KD_BUDGET = 2 * 10**7  # max K'·d for the O(K·d) bases (time grows linearly in K)


def lora_like(d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """LoRA-shaped fp32 tensors (16x2048 and 2048x16) with heterogeneous norms, d elements."""
    out: dict[str, torch.Tensor] = {}
    i, left = 0, d
    scales = torch.exp(0.7 * rng.normal(rng.derive_key(seed, 1), 0, d // 32768 + 2)).tolist()
    while left > 0:
        n = min(32768, left)
        shape = (16, n // 16) if i % 2 == 0 and n % 16 == 0 else (n,)
        if i % 2 == 1 and n % 16 == 0:
            shape = (n // 16, 16)
        x = rng.normal(rng.derive_key(seed, 2), i, n) * (1e-3 * scales[i])
        out[f"layers.{i // 2}.lora_{'AB'[i % 2]}"] = x.view(shape)
        i, left = i + 1, left - n
    return out


def sq(d: dict[str, torch.Tensor]) -> float:
    return float(sum((t.double() ** 2).sum() for t in d.values()))


def best_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_codec(
    codec: codecs.Codec, delta: dict[str, torch.Tensor], trials: int, repeats: int
) -> tuple[float, int, float]:
    """(encode+decode seconds, payload bytes, measured MSE/‖Δ‖²)."""
    norm2 = sq(delta)

    def once(key: int = 1) -> dict[str, torch.Tensor]:
        return codec.decode(codec.encode(delta, key), like=delta)

    sec = best_time(once, repeats)
    nbytes = len(codec.encode(delta, 1))
    err = 0.0
    for t in range(trials):
        out = once(rng.derive_key(99, t))
        err += sum(float(((out[n].double() - delta[n].double()) ** 2).sum()) for n in delta)
    return sec, nbytes, err / trials / norm2


def bench(d: int, quick: bool) -> list[dict[str, object]]:
    delta = lora_like(d)
    norm2 = sq(delta)
    k = default_k(d, 64.0)
    big = d >= 10**7
    repeats, trials = (1, 2) if big else (3, 4)
    rows: list[dict[str, object]] = []
    copy_s = best_time(lambda: {n: t.clone() for n, t in delta.items()}, 5)
    rows.append({"codec": "copy of Δ", "k": "-", "bytes": 4 * d, "sec": copy_s, "mse": 0.0, "theory": 0.0})
    plan: list[tuple[str, dict[str, object]]] = [
        ("dense", {}),
        ("dense", {"coef_bits": 8}),
        ("srht", {"k": k}),
        ("srht", {"k": k, "coef_bits": 8}),
        ("countsketch", {"k": k}),
        ("countsketch", {"k": k, "coef_bits": 8}),
        ("rademacher", {"k": k}),
        ("gaussian", {"k": k}),
    ]
    for name, opts in plan:
        label = name + (f" int{opts['coef_bits']}" if "coef_bits" in opts else "")
        kk = int(opts.get("k", d))  # type: ignore[call-overload]
        scale = 1.0
        if name in ("gaussian", "rademacher") and kk * d > DENSE_O_KD_BUDGET:
            k_small = max(64, DENSE_O_KD_BUDGET // d)
            scale = kk / k_small
            opts = {**opts, "k": k_small}
        codec = codecs.get(name, **opts)
        t_trials = 1 if scale > 1 and big else trials
        sec, nbytes, mse = run_codec(codec, delta, t_trials, 1 if scale > 1 else repeats)
        theory = codec.theory_mse(delta) / norm2 if isinstance(codec, ProjectionCodec) else 0.0
        rows.append(
            {
                "codec": label,
                "k": kk if scale == 1 else f"{kk} (timed at {opts['k']})",
                "bytes": nbytes if scale == 1 else round(nbytes * scale),
                "sec": sec * scale,
                "extrapolated": scale > 1,
                "mse": mse,
                "theory": theory,
                "mse_at": opts.get("k"),
            }
        )
        print(f"d={d:.0e} {label:18s} {sec * scale:9.4f}s mse={mse:.4g} theory={theory:.4g}", flush=True)
    return rows


def table(d: int, rows: list[dict[str, object]]) -> str:
    copy_s = float(rows[0]["sec"])  # type: ignore[arg-type]
    gauss = next(r for r in rows if r["codec"] == "gaussian")
    g_s = float(gauss["sec"])  # type: ignore[arg-type]
    out = [
        f"**d = {d:,}** (K = {default_k(d, 64.0):,}, {len(lora_like(d))} tensors)",
        "",
        "| codec | K | payload bytes | encode+decode s | × copy | gaussian ÷ this | MSE/‖Δ‖² measured | theory | measured/theory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sec = float(r["sec"])  # type: ignore[arg-type]
        star = "*" if r.get("extrapolated") else ""
        th = float(r["theory"])  # type: ignore[arg-type]
        mse = float(r["mse"])  # type: ignore[arg-type]
        ratio = f"{mse / th:.3f}" if th > 0 else ("exact" if mse == 0 else f"{mse:.1e} (quant.)")
        note = f" (at K={r['mse_at']})" if r.get("extrapolated") else ""
        out.append(
            f"| {r['codec']} | {r['k']} | {int(r['bytes']):,} | {sec:.4f}{star} | {sec / copy_s:.1f} | "  # type: ignore[call-overload]
            f"{g_s / sec:.1f} | {mse:.4g}{note} | {th:.4g} | {ratio} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="d in {1e4, 1e5} (sanity check)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs alone")
    args = ap.parse_args()
    dims = [10**4, 10**5] if args.quick else [10**5, 10**6, 10**7]
    sections = []
    for d in dims:
        sections.append(table(d, bench(d, args.quick)))
    md = "\n\n".join(
        [
            "## Codecs (`benchmarks/codecs.py`" + (" --quick" if args.quick else "") + ")",
            f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; "
            "shared machine, so compare ratios, not absolute times. Update: LoRA-shaped fp32 "
            "tensors with log-normal norms; K = clamp(d/64, 4096, 65536), split "
            "K_l ∝ √d_l‖Δ_l‖. `*` = O(K·d) basis timed at a smaller K' and extrapolated "
            "linearly to K (its MSE measured at K'). MSE averaged over several keys; theory = "
            "Σ_l ω_l‖Δ_l‖² with ω = (d+1)/K Gaussian, (d−1)/K Rademacher and count-sketch, "
            "(n−K)(d−1)/(K(n−1)) SRHT (n = padded size).",
            *sections,
        ]
    )
    print(md)
    if not args.no_write:
        write_section("codecs", md)


if __name__ == "__main__":
    main()
