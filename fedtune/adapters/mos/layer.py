"""The MoS modules: the pools of one module type, their container, and the wrapped Linear."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from fedtune import rng
from fedtune.adapters.mos.config import MoSConfig

__all__ = ["MOS_POOLS_ATTR", "MoSLinear", "MoSPool", "MoSPools", "mos_linears"]

MOS_POOLS_ATTR = "mos_pools"
"""Name of the submodule that :meth:`MoS.attach` adds to the model (holds every pool)."""

# Domain-separation tags for rng.derive_key: ASCII "MoS-grp" / "MoS-key" / "MoS-hea".
# (All of the package's tags live here, so that they stay distinct.)
_TAG_GROUP = 0x4D6F532D677270
_TAG_KEY_FINGERPRINT = 0x4D6F532D6B6579
_TAG_HEAD = 0x4D6F532D686561
# Streams inside one group key: 0 = A-pool init; 1 + 2i = layer i's A indices, 2 + 2i = its B.
_STREAM_A_INIT = 0


class MoSPool(nn.Module):
    """The A- and B-pool of one module type: ``A`` (N, d_in/l), ``B`` (N, d_out/l)."""

    def __init__(self, type_name: str, n_shards: int, d_in: int, d_out: int, l: int) -> None:  # noqa: E741
        super().__init__()
        self.type_name = type_name
        self.d_in, self.d_out, self.l = d_in, d_out, l
        self.A = nn.Parameter(torch.zeros(n_shards, d_in // l))
        self.B = nn.Parameter(torch.zeros(n_shards, d_out // l))

    @torch.no_grad()
    def reset_parameters(self, group_key: int) -> None:
        """A: Kaiming-uniform(a=sqrt(5)) with fan-in ``d_in`` from the key; B: zeros.

        ``kaiming_uniform_(a=sqrt(5))`` has bound ``gain * sqrt(3 / fan_in)`` with
        ``gain = sqrt(2 / (1 + 5))``, i.e. ``1 / sqrt(d_in)``. The draw is on CPU so every
        party gets bit-identical values.
        """
        bound = 1.0 / math.sqrt(self.d_in)
        u = rng.uniform(group_key, _STREAM_A_INIT, self.A.numel())
        a = (u * 2.0 - 1.0) * bound
        self.A.copy_(a.reshape(self.A.shape))
        self.B.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.type_name!r}, shards={self.A.shape[0]}, d_in={self.d_in}, "
            f"d_out={self.d_out}, l={self.l}"
        )


class MoSPools(nn.Module):
    """Container added to the model as ``model.mos_pools``; also records how it was built."""

    def __init__(self, config: MoSConfig, key: int, modules_to_save: list[str]) -> None:
        super().__init__()
        self.groups = nn.ModuleDict()
        self.config = dataclasses.replace(config)
        self.key_fingerprint = rng.derive_key(key, _TAG_KEY_FINGERPRINT)
        self.saved_modules = list(modules_to_save)


class MoSLinear(nn.Module):
    """An ``nn.Linear`` plus a MoS update gathered from a shared pool.

    The pool is referenced, not owned (it is owned by ``model.mos_pools``), so its
    parameters appear once in ``named_parameters``. The index lists are non-persistent
    buffers: they are rebuilt from the key, never sent or aggregated.
    """

    mos_index_A: torch.Tensor
    mos_index_B: torch.Tensor

    def __init__(
        self,
        base: nn.Linear,
        pool: MoSPool,
        index_a: torch.Tensor,
        index_b: torch.Tensor,
        *,
        rank: int,
        scaling: float,
        dropout: float,
        layer: int,
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.__dict__["pool"] = pool  # plain attribute: not a submodule
        self.rank = rank
        self.scaling = scaling
        self.layer = layer
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.register_buffer("mos_index_A", index_a.to(base.weight.device), persistent=False)
        self.register_buffer("mos_index_B", index_b.to(base.weight.device), persistent=False)
        self.mos_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def pool(self) -> MoSPool:
        return self.__dict__["pool"]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (code that inspects ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``A`` (r, d_in) and ``B`` (d_out, r), gathered from the pool."""
        a = self.pool.A[self.mos_index_A].reshape(self.rank, self.in_features)
        b = self.pool.B[self.mos_index_B].reshape(self.rank, self.out_features).t()
        return a, b

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) * B A`` with the Linear weight's shape (d_out, d_in)."""
        a, b = self.factors()
        return (b @ a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        a, b = self.factors()
        h = self.mos_dropout(x).to(a.dtype)
        return out + (F.linear(F.linear(h, a), b) * self.scaling).to(out.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, layer={self.layer}"


def mos_linears(model: nn.Module) -> Iterator[tuple[str, MoSLinear]]:
    """``(full name, wrapper)`` for every MoS layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MoSLinear):
            yield name, module


def _find_pools(model: nn.Module) -> MoSPools | None:
    pools = getattr(model, MOS_POOLS_ATTR, None)
    return pools if isinstance(pools, MoSPools) else None


def _require_pools(model: nn.Module) -> MoSPools:
    pools = _find_pools(model)
    if pools is None:
        raise ValueError(
            f"model has no MoS adapter (no '{MOS_POOLS_ATTR}' submodule); call MoS(...).attach first"
        )
    return pools


def _set_submodule(model: nn.Module, full_name: str, module: nn.Module) -> None:
    parent_name, _, child = full_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
