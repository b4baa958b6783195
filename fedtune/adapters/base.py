"""The adapter protocol and the helpers every adapter shares.

An adapter method (LoRA through PEFT, our MoS module, ...) is one file in this package
that registers a factory with ``@register("name")``. The factory takes the method's
hyper-parameters as keyword options and returns an object with two methods:

``attach(model, key) -> nn.Module``
    Inject the adapter into ``model`` (base weights frozen), initialise every random
    part from the 64-bit ``key`` through :mod:`fedtune.rng` (so that server and clients
    build identical adapters), and return the model to train.
``export_peft(model, out_dir) -> None``
    Write a plain PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``peft.PeftModel.from_pretrained(base, out_dir)`` loads with the same outputs.

Everything that travels between server and clients is :func:`trainable_state`: the
trainable tensors in a fixed order, as fp32 CPU tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from fedtune.layout import layout_hash
from fedtune.registry import Registry

__all__ = ["REGISTRY", "Adapter", "layout_hash", "load_trainable_state", "trainable_state"]


class Adapter(Protocol):
    """What a registered adapter factory returns."""

    name: str

    def attach(self, model: nn.Module, key: int) -> nn.Module: ...

    def export_peft(self, model: nn.Module, out_dir: Path) -> None: ...


REGISTRY: Registry[Adapter] = Registry("adapter")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` as detached fp32 CPU copies.

    Order is ``model.named_parameters()`` order, which is deterministic for one
    architecture and adapter config; :func:`layout_hash` pins it.
    """
    return {
        name: p.detach().to(device="cpu", dtype=torch.float32).clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters of ``model`` (names and shapes must match)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"adapter state does not match the model: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
            f"{'...' if len(extra) > 3 else ''}"
        )
    with torch.no_grad():
        for name, p in params.items():
            src = state[name]
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(
                    f"adapter tensor {name!r} has shape {tuple(src.shape)}, model expects {tuple(p.shape)}"
                )
            p.copy_(src.to(device=p.device, dtype=p.dtype))
