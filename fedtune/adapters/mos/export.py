"""Leaving MoS: export as a plain PEFT LoRA adapter, or merge into the base weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedtune.adapters.mos.layer import (
    MOS_POOLS_ATTR,
    _require_pools,
    _set_submodule,
    mos_linears,
)

__all__ = ["export_peft", "merge_into_base"]


def export_peft(model: nn.Module, out_dir: Path | str) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as plain PEFT LoRA.

    Every MoS layer becomes a LoRA layer of rank ``r`` with its gathered ``A``/``B``
    (``save_tied_lora`` in the reference code) and ``lora_alpha = alpha`` (same scaling
    ``alpha / r``); ``modules_to_save`` are written in full. ``PeftModel.from_pretrained
    (base, out_dir)`` on the unmodified base model then gives the same outputs.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    pools = _require_pools(model)
    cfg = pools.config
    layers = list(mos_linears(model))
    ranks = {m.rank for _, m in layers}
    if len(ranks) != 1:
        # Only possible with subset_selection=False and types of different depth.
        rank_pattern = {name: m.rank for name, m in layers}
        alpha_pattern = {name: cfg.alpha for name, m in layers}
        rank = max(ranks)
    else:
        rank_pattern, alpha_pattern, rank = {}, {}, ranks.pop()
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, m in layers:
            a, b = m.factors()
            state[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
            state[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
        for mod_name in pools.saved_modules:
            for k, t in model.get_submodule(mod_name).state_dict().items():
                state[f"base_model.model.{mod_name}.{k}"] = t.detach().cpu().contiguous()
    alpha: float | int = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=cfg.dropout,
        target_modules=[name for name, _ in layers],
        modules_to_save=list(pools.saved_modules) or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="none",
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def merge_into_base(model: nn.Module) -> nn.Module:
    """Fold every ``(alpha / r) B A`` into its base Linear, remove wrappers and pools.

    Returns ``model`` (modified in place): a plain model for serving whose outputs equal
    the adapted model's in eval mode. ``modules_to_save`` already hold their trained
    weights in place.
    """
    _require_pools(model)
    for name, m in list(mos_linears(model)):
        base = m.base_layer
        base.weight.add_(m.delta_weight().to(base.weight.dtype))
        _set_submodule(model, name, base)
    delattr(model, MOS_POOLS_ATTR)
    return model
