"""LoRA through PEFT (Hu et al., 2022, "LoRA: Low-Rank Adaptation of Large Language Models").

ΔW = (α / r) · B A with A ∈ R^{r×d_in}, B ∈ R^{d_out×r} (eq. 3 of the paper). PEFT does the
injection; we only replace its random initialisation with draws from :mod:`fedtune.rng` so
that the server and every client build bit-identical adapters from the run key (PEFT's
``kaiming_uniform_`` uses torch's global RNG, which differs between processes and devices).

``ffa=True`` is FFA-LoRA (Sun et al., ICLR 2024, "Improving LoRA in Privacy-preserving Federated
Learning"): A stays frozen at its keyed initialisation and only B (and the task head) is
trained and sent, so averaging the clients' B is exactly averaging their ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from fedtune import rng
from fedtune.adapters.base import REGISTRY


@REGISTRY.register("lora")
@dataclass
class LoRA:
    """LoRA hyper-parameters; ``attach`` builds the PEFT model."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    task: Literal["classification", "causal-lm"] = "classification"
    ffa: bool = False
    name: str = field(default="lora", init=False)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")

    @classmethod
    def from_config(cls, cfg: Any, **options: Any) -> LoRA:
        """From the run config's named keys (``lora-r``, ``lora-alpha``, ``lora-dropout``,
        ``target-modules``, ``task``, ``factor-mode='ffa'``); ``adapter-*`` options win."""
        return cls(
            **{
                "r": cfg.lora_r,
                "alpha": cfg.lora_alpha,
                "dropout": cfg.lora_dropout,
                "target_modules": cfg.targets,
                "task": cfg.task,
                "ffa": cfg.factor_mode == "ffa",
                **options,
            }
        )

    def attach(self, model: nn.Module, key: int) -> nn.Module:
        """Wrap ``model`` with PEFT LoRA, initialised from ``key``; base weights frozen."""
        linear_names = {
            n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)
        }
        missing = [t for t in self.target_modules if t not in linear_names]
        if missing:
            raise ValueError(
                f"target module(s) {missing} not found; Linear layers of this model: "
                f"{', '.join(sorted(linear_names))}"
            )
        cfg = LoraConfig(
            task_type=TaskType.SEQ_CLS if self.task == "classification" else TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # PEFT accepts floats
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
        )
        with torch.random.fork_rng(devices=[]):  # PEFT's init draws; overwritten below
            peft_model = get_peft_model(model, cfg)
        init_from_key(peft_model, key, freeze_a=self.ffa)
        return peft_model

    def export_peft(self, model: nn.Module, out_dir: Path) -> None:
        """``save_pretrained``: adapter_config.json + adapter_model.safetensors."""
        if not isinstance(model, PeftModel):
            raise TypeError("export_peft expects the model returned by attach()")
        model.save_pretrained(str(out_dir), safe_serialization=True)


def init_from_key(model: nn.Module, key: int, *, freeze_a: bool = False) -> None:
    """Keyed init: A ~ U(-1/√d_in, 1/√d_in) (PEFT's kaiming_uniform(a=√5) bound), B = 0,
    task-head weights ~ N(0, 0.02²) with zero bias (BERT's initializer_range)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(p.shape[1])
                u = rng.uniform(key, i, p.numel(), device=p.device).view_as(p)
                p.copy_((2 * u - 1) * bound)
                if freeze_a:
                    p.requires_grad_(False)
            elif ".lora_B." in name:
                p.zero_()
            elif ".modules_to_save." in name and p.requires_grad:
                if name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(rng.normal(key, i, p.numel(), device=p.device).view_as(p) * 0.02)
