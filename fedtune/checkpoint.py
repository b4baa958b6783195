"""Atomic save / resume of the whole server state after every round.

A checkpoint is a folder ``<run>/checkpoint/`` with

* ``adapter.safetensors`` — the global trainable state (fp32),
* ``server_opt.safetensors`` — the server optimizer's tensors (moments, momentum),
* ``residual.safetensors`` — ``factor-mode='exact'`` only: the running FedEx-LoRA residual
  of every adapted layer's frozen weight (absent otherwise; a missing file reads as none),
* ``state.json`` — round, run seed, the flat config, the optimizer's scalar state and the
  strategy's client identities.

It is written to a temporary folder next to it and swapped in with ``os.replace``, so a
crash mid-write leaves the previous checkpoint intact; a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

NAME = "checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the run's config."""


@dataclass
class Checkpoint:
    round: int
    seed: int
    config: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    server_opt: dict[str, Any]  # {"tensors": {...}, "scalars": {...}}
    extra: dict[str, Any]
    # factor-mode='exact': per-layer residual R of the frozen base weights (fedtune.adapters.exact)
    residual: dict[str, torch.Tensor] = field(default_factory=dict)


def _split_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)
    }
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return tensors, scalars


def save(run_dir: Path, ck: Checkpoint) -> Path:
    """Write ``ck`` atomically to ``run_dir/checkpoint``."""
    final = run_dir / NAME
    tmp = run_dir / f".{NAME}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ck.adapter.items()}, str(tmp / "adapter.safetensors"))
    opt_tensors, opt_scalars = _split_state(ck.server_opt)
    save_file(opt_tensors, str(tmp / "server_opt.safetensors"))
    if ck.residual:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in ck.residual.items()},
            str(tmp / "residual.safetensors"),
        )
    meta = {
        "version": VERSION,
        "round": ck.round,
        "seed": ck.seed,
        "config": ck.config,
        "server_opt_scalars": opt_scalars,
        "adapter_order": list(ck.adapter),
        "extra": ck.extra,
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    old = run_dir / f".{NAME}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)  # rename is atomic; then the new one takes its place
    os.replace(tmp, final)
    # ours, and any copies (set aside or half-written) that a killed save left behind
    for stale in [*run_dir.glob(f".{NAME}.old-*"), *run_dir.glob(f".{NAME}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load(run_dir: Path) -> Checkpoint:
    """Read ``run_dir/checkpoint`` or raise :class:`CheckpointError` saying what is wrong."""
    d = Path(run_dir) / NAME
    if not (d / "state.json").is_file():
        # killed between save()'s two renames: the previous checkpoint is whole under .old-*
        olds = sorted(
            Path(run_dir).glob(f".{NAME}.old-*/state.json"), key=lambda p: p.stat().st_mtime
        )
        if not olds:
            raise CheckpointError(f"no checkpoint in '{run_dir}' (expected {d / 'state.json'})")
        d = olds[-1].parent
    try:
        meta = json.loads((d / "state.json").read_text())
        adapter = load_file(str(d / "adapter.safetensors"))
        opt = load_file(str(d / "server_opt.safetensors"))
        residual = (
            load_file(str(d / "residual.safetensors"))
            if (d / "residual.safetensors").is_file()
            else {}
        )
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint in '{run_dir}' is unreadable: {e}") from None
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint version {meta.get('version')} is not supported (expected {VERSION})"
        )
    order = meta["adapter_order"]
    return Checkpoint(
        round=int(meta["round"]),
        seed=int(meta["seed"]),
        config=meta["config"],
        adapter={k: adapter[k] for k in order},
        server_opt={**opt, **meta["server_opt_scalars"]},
        extra=meta.get("extra", {}),
        residual=residual,
    )


#: config keys that may differ between the interrupted run and its resumption
# downlink changes only how the same global adapter travels (clients rebuild it bit for bit)
RESUMABLE_CHANGES = {
    "num-rounds",
    "resume",
    "run-name",
    "output-dir",
    "round-timeout",
    "device",
    "downlink",
}


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resumed run must use the same config except for keys that cannot change the result."""
    from fedtune.config import Config

    # a key the checkpoint lacks was added later: the run used its default
    defaults = Config().to_flat()
    diff = sorted(
        k
        for k in set(saved) | set(current)
        if k not in RESUMABLE_CHANGES
        and saved.get(k, defaults.get(k)) != current.get(k, defaults.get(k))
    )
    if diff:
        show = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:5])
        raise CheckpointError(f"cannot resume: the config differs from the checkpoint's ({show})")
