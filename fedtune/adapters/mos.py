"""MoS: Mixture of Shards, LoRA with rank vectors gathered from pools shared across layers.

Paper: Wang et al., "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with
Mixture of Shards", ICLR 2025 (arXiv 2410.00938); reference code ``Forence1999/MoS``,
``modules/Tied_LoRA.py``. Notation follows the paper and ``research/mos_and_federated_lora.md``:

==========  ================================================================================
symbol      meaning (option name)
==========  ================================================================================
``L``       number of layers of one module type (e.g. the 6 ``query`` Linears of MiniLM)
``e``       equivalent rank: the trainable budget equals LoRA at rank ``e`` (``e``)
``r``       active rank of every layer, ``r >= e`` (``r``)
``p``       private rank per layer (``p``)
``l``       shards per rank vector (``l``)
==========  ================================================================================

**Pools.** Every module type ``t`` (the module path with its layer numbers replaced by
``*``, together with the shape ``(d_in, d_out)``) owns two pools shared by its ``L`` layers,

    P_A in R^{N x d_in/l},   P_B in R^{N x d_out/l},   N = e * L * l,

so the trainable count is ``sum_t e * L * (d_in + d_out)``, exactly LoRA at rank ``e``.
Shards ``[0, (e-p)Ll)`` are public; layer ``i`` owns the private block
``[(e-p)Ll + i*p*l, (e-p)Ll + (i+1)*p*l)``.

**Index lists.** Per layer and side, ``I = choice((e-p)Ll, (r-p)l) ++ private block``
(length ``r*l``), drawn once from the adapter key through :mod:`fedtune.rng` and frozen
(the paper's "router" is this fixed random assignment, not a learned one).

**Assembly and forward** (paper Sec. 3; reference ``LoraLinear4bit_Tied_LoRA_forward``): row ``j``
of ``A_i`` concatenates shards ``I^A[jl], ..., I^A[jl+l-1]``, column ``j`` of ``B_i``
likewise from ``P_B``, and

    h = W_0 x + (alpha / r) * B_i A_i dropout(x).

**Scaling convention.** ``alpha / r`` with ``r`` the per-layer active rank, as in the
reference forward (``lora_alpha / lora_r``) and in PEFT LoRA without rsLoRA; the PEFT
export therefore writes ``r`` and ``lora_alpha = alpha`` unchanged. With
``subset_selection=False`` the active rank is ``(e-p)L + p`` and the scaling uses it.

**Initialisation** (``LoraLayer_reset_lora_parameters``): ``P_A`` Kaiming-uniform with
``a = sqrt(5)`` and fan-in ``d_in`` (bound ``1/sqrt(d_in)``), ``P_B`` zeros, so the adapted
model starts equal to the base model.

**The four differentiation strategies** (paper Sec. 3), each a switch for ablations:

- ``subset_selection``: each layer uses ``r - p`` of the ``(e-p)L`` public vectors. Off
  ("pure sharing"): every layer uses all public vectors (in a random order, which only
  matters together with the other strategies); the active rank becomes ``(e-p)L + p``.
- ``pair_dissociation``: ``I^B`` is drawn independently of ``I^A``. Off: ``I^B = I^A``.
- ``vector_sharding``: the ``l`` shards of a vector are drawn independently. Off: shards
  are drawn in aligned groups of ``l`` (whole pool vectors), which equals ``l = 1``.
- ``shard_privatization``: ``p`` private ranks per layer. Off: ``p`` is treated as 0.

**Federated use.** Gathering is linear, so averaging the pools has LoRA's bilinear bias in
every layer. With ``ffa=True`` the A-pool is frozen at its key-derived value (FFA-LoRA,
Sun et al., ICLR 2024) and only the B-pool is trained and sent, which makes averaging
exact. Index lists must be identical on all parties: they depend only on (key, config,
architecture); :func:`mos_layout_digest` fingerprints them and :func:`check_indices`
rebuilds and compares them.

Dropout, when enabled, uses torch's RNG: it is local training noise that no other party
needs to reproduce.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedtune import rng
from fedtune.adapters.base import REGISTRY, trainable_state
from fedtune.layout import combine_hashes, layout_hash

__all__ = [
    "MOS_POOLS_ATTR",
    "MoS",
    "MoSIndexMismatch",
    "MoSLinear",
    "MoSPool",
    "MoSPools",
    "check_indices",
    "combine_hashes",
    "merge_into_base",
    "mos_layout_digest",
    "mos_layout_hash",
    "mos_linears",
]

MOS_POOLS_ATTR = "mos_pools"
"""Name of the submodule that :meth:`MoS.attach` adds to the model (holds every pool)."""

# Domain-separation tags for rng.derive_key: ASCII "MoS-grp" / "MoS-key" / "MoS-hea".
_TAG_GROUP = 0x4D6F532D677270
_TAG_KEY_FINGERPRINT = 0x4D6F532D6B6579
_TAG_HEAD = 0x4D6F532D686561
# Streams inside one group key: 0 = A-pool init; 1 + 2i = layer i's A indices, 2 + 2i = its B.
_STREAM_A_INIT = 0
_DIGEST_VERSION = b"fedtune-mos-v1"


class MoSIndexMismatch(ValueError):
    """A model's MoS index lists were not built from the expected key and config."""


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"mos option {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"mos option {name} must be >= {minimum}, got {value}")


def _as_names(name: str, value: Any) -> tuple[str, ...] | str | None:
    """``None``, a regex string, or a non-empty sequence of non-empty module-name suffixes."""
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not value:
            raise ValueError(f"mos option {name} must not be an empty string")
        return value
    if isinstance(value, Sequence):
        names = tuple(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                f"mos option {name} must be a non-empty list of module names, got {value!r}"
            )
        return names
    raise ValueError(f"mos option {name} must be a list of names or a regex, got {value!r}")


@REGISTRY.register("mos")
@dataclasses.dataclass
class MoS:
    """MoS adapter factory (Wang et al., ICLR 2025); options are validated on construction.

    Args:
        r: active rank of every adapted layer (``lora_r`` in the reference code).
        e: equivalent rank; trainable parameters equal LoRA at rank ``e``
            (``valid_param_lora_r``).
        p: private rank per layer (``valid_param_private_r``); ``p <= e <= r``.
        l: shards per rank vector (``num_chunk_per_vec``); must divide every ``d_in``/``d_out``.
        alpha: scaling numerator; the update is ``(alpha / r) * B A x``.
        dropout: dropout on the adapter input (training only).
        target_modules: which ``nn.Linear`` modules get MoS. A list/tuple of names matches
            a module whose full name equals a name or ends with ``"." + name``; a string is a
            regex matched against the full name (PEFT's convention). ``None``: PEFT's default
            LoRA targets for the model type (e.g. ``query``/``value`` for BERT).
        modules_to_save: modules trained in full (e.g. ``("classifier",)``), matched by suffix.
        reinit_modules_to_save: re-initialise the Linear/Embedding weights inside
            ``modules_to_save`` from the key (normal, std ``config.initializer_range`` or
            0.02; biases zero), so that every party starts from the same task head (HF
            initialises new heads from torch's global RNG). Set False for pretrained modules
            such as ``lm_head``.
        ffa: freeze the A-pool at its key-derived init, train only the B-pool (exact averaging).
        subset_selection, pair_dissociation, vector_sharding, shard_privatization: the paper's
            four differentiation strategies (module docstring), on by default.
    """

    name: str = dataclasses.field(default="mos", init=False, repr=False, compare=False)

    r: int = 6
    e: int = 2
    p: int = 1
    l: int = 4  # noqa: E741  (the paper's symbol)
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] | None = None
    reinit_modules_to_save: bool = True
    ffa: bool = False
    subset_selection: bool = True
    pair_dissociation: bool = True
    vector_sharding: bool = True
    shard_privatization: bool = True

    def __post_init__(self) -> None:
        _check_int("r", self.r, 1)
        _check_int("e", self.e, 1)
        _check_int("p", self.p, 0)
        _check_int("l", self.l, 1)
        if not self.p <= self.e <= self.r:
            raise ValueError(
                f"mos needs p <= e <= r (private rank <= equivalent rank <= active rank), "
                f"got p={self.p}, e={self.e}, r={self.r}"
            )
        if self.subset_selection and self.shard_privatization and self.p == self.e < self.r:
            raise ValueError(
                f"mos with p = e = {self.e} has no public shards, so every layer's rank is "
                f"p = {self.p}; set r = {self.p} (plain LoRA) or lower p"
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise ValueError(f"mos option alpha must be a number, got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"mos option alpha must be finite and > 0, got {self.alpha}")
        self.alpha = float(self.alpha)  # 16 and 16.0 must give one digest
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ValueError(f"mos option dropout must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"mos option dropout must be in [0, 1), got {self.dropout}")
        self.dropout = float(self.dropout)
        for flag in (
            "reinit_modules_to_save",
            "ffa",
            "subset_selection",
            "pair_dissociation",
            "vector_sharding",
            "shard_privatization",
        ):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(
                    f"mos option {flag} must be true or false, got {getattr(self, flag)!r}"
                )
        self.target_modules = _as_names("target_modules", self.target_modules)
        mts = _as_names("modules_to_save", self.modules_to_save)
        if isinstance(mts, str):
            raise ValueError("mos option modules_to_save must be a list of module names")
        self.modules_to_save = mts

    # -- derived sizes ------------------------------------------------------------------

    @property
    def private_rank(self) -> int:
        """``p`` as used: 0 when shard privatization is switched off."""
        return self.p if self.shard_privatization else 0

    def layer_rank(self, n_layers: int) -> int:
        """Active rank of each layer of a type with ``n_layers`` layers."""
        p = self.private_rank
        return self.r if self.subset_selection else (self.e - p) * n_layers + p

    def options(self) -> dict[str, Any]:
        """The options as plain JSON-able values (stored with the model, hashed in the digest)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        for k in ("target_modules", "modules_to_save"):
            if isinstance(out[k], tuple):
                out[k] = list(out[k])
        return out

    # -- the Adapter protocol ---------------------------------------------------------------

    def attach(self, model: nn.Module, key: int) -> nn.Module:
        """Freeze ``model``, wrap its target Linears with MoS, initialise from ``key``.

        Modifies ``model`` in place and returns it. Pools live in the submodule
        ``model.mos_pools`` (registered last, so they come last in ``named_parameters``);
        every random draw (A-pool values, index lists) comes from :mod:`fedtune.rng`.
        """
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 1 << 64:
            raise ValueError(f"mos attach key must be an int in [0, 2**64), got {key!r}")
        if _find_pools(model) is not None or any(True for _ in mos_linears(model)):
            raise ValueError("model already has MoS adapters attached")
        targets = _match_targets(model, self.target_modules)
        saved = _match_modules_to_save(model, self.modules_to_save, set(targets))
        groups = _group_targets(targets)
        self._validate_groups(groups)

        for param in model.parameters():
            param.requires_grad_(False)
        for mod_name in saved:
            for param in model.get_submodule(mod_name).parameters():
                param.requires_grad_(True)
        if self.reinit_modules_to_save:
            _reinit_saved(model, saved, key)

        pools = MoSPools(self, key, saved)
        for gname, (type_name, (d_in, d_out), members) in groups.items():
            n_layers = len(members)
            rank = self.layer_rank(n_layers)
            pool = MoSPool(
                type_name, n_shards=self.e * n_layers * self.l, d_in=d_in, d_out=d_out, l=self.l
            )
            pool.to(device=members[0][1].weight.device)
            gkey = _group_key(key, type_name, d_in, d_out)
            pool.reset_parameters(gkey)
            pool.A.requires_grad_(not self.ffa)
            pool.B.requires_grad_(True)
            pools.groups[gname] = pool
            for i, (full_name, linear) in enumerate(members):
                idx_a, idx_b = _layer_indices(self, gkey, i, n_layers)
                wrapper = MoSLinear(
                    linear,
                    pool,
                    idx_a,
                    idx_b,
                    rank=rank,
                    scaling=self.alpha / rank,
                    dropout=self.dropout,
                    layer=i,
                )
                _set_submodule(model, full_name, wrapper)
        model.add_module(MOS_POOLS_ATTR, pools)
        return model

    def export_peft(self, model: nn.Module, out_dir: Path | str) -> None:
        """Write the materialised adapter as plain PEFT LoRA (see :func:`export_peft`)."""
        export_peft(model, out_dir)

    def check_indices(self, model: nn.Module, key: int) -> None:
        """:func:`check_indices` with this config as the expected one."""
        check_indices(model, key, config=self)

    def _validate_groups(
        self, groups: dict[str, tuple[str, tuple[int, int], list[tuple[str, nn.Linear]]]]
    ) -> None:
        p = self.private_rank
        problems = []
        for type_name, (d_in, d_out), members in groups.values():
            n_layers = len(members)
            bad = [f"{k}={d}" for k, d in (("d_in", d_in), ("d_out", d_out)) if d % self.l]
            if bad:
                problems.append(
                    f"{type_name}: l={self.l} shards per vector must divide {', '.join(bad)}"
                )
            if self.subset_selection and self.r - p > (self.e - p) * n_layers:
                problems.append(
                    f"{type_name}: r - p = {self.r - p} exceeds the (e - p) * L = "
                    f"{(self.e - p) * n_layers} public vectors of its L={n_layers} layers "
                    f"(lower r or raise e)"
                )
        if problems:
            raise ValueError("mos config does not fit the model: " + "; ".join(problems))


# --------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------


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

    def __init__(self, config: MoS, key: int, modules_to_save: list[str]) -> None:
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


# --------------------------------------------------------------------------------------
# target matching and grouping
# --------------------------------------------------------------------------------------


def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _default_targets(model: nn.Module) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MAP:
        raise ValueError(
            f"mos: no default target_modules for model type {model_type!r}; "
            "set target_modules (e.g. ['q_proj', 'v_proj'])"
        )
    return list(MAP[model_type])


def _match_targets(
    model: nn.Module, target_modules: tuple[str, ...] | str | None
) -> dict[str, nn.Linear]:
    """Full name -> Linear for every targeted module; errors name what did not match."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    candidates = sorted({n.rsplit(".", 1)[-1] for n in linears})
    hint = f"nn.Linear module names in this model: {', '.join(candidates) or '(none)'}"
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(
                f"mos target_modules regex {target_modules!r} is invalid: {err}"
            ) from None
        found = {n: m for n, m in linears.items() if pattern.fullmatch(n)}
        if not found:
            raise ValueError(
                f"mos target_modules regex {target_modules!r} matched no nn.Linear; {hint}"
            )
        return found
    targets = list(target_modules) if target_modules is not None else _default_targets(model)
    missing = [t for t in targets if not any(_suffix_match(n, t) for n in linears)]
    if missing:
        raise ValueError(f"mos target_modules {missing} matched no nn.Linear; {hint}")
    return {n: m for n, m in linears.items() if any(_suffix_match(n, t) for t in targets)}


def _match_modules_to_save(
    model: nn.Module, names: tuple[str, ...] | None, targets: set[str]
) -> list[str]:
    if not names:
        return []
    modules = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for t in names:
        hits = [n for n in modules if _suffix_match(n, t)]
        if not hits:
            tops = sorted({n.rsplit(".", 1)[-1] for n in modules if "." not in n})
            raise ValueError(
                f"mos modules_to_save {t!r} matched no module; top-level modules: {', '.join(tops)}"
            )
        clash = [h for h in hits if h in targets]
        if clash:
            raise ValueError(f"mos modules_to_save {t!r} is also a MoS target: {clash[:3]}")
        out.extend(h for h in hits if h not in out)
    return out


_LAYER_NUMBER = re.compile(r"(?<![^.])\d+(?![^.])")  # a path component made of digits


def _group_targets(
    targets: dict[str, nn.Linear],
) -> dict[str, tuple[str, tuple[int, int], list[tuple[str, nn.Linear]]]]:
    """Pool key -> (type name, (d_in, d_out), layers in module order).

    A module type is the module path with its numeric components (layer numbers) replaced
    by ``*``, e.g. ``bert.encoder.layer.*.attention.self.query``; Linears of one type with
    different shapes get separate pools.
    """
    groups: dict[tuple[str, int, int], list[tuple[str, nn.Linear]]] = {}
    for full_name, linear in targets.items():
        type_name = _LAYER_NUMBER.sub("*", full_name)
        groups.setdefault((type_name, linear.in_features, linear.out_features), []).append(
            (full_name, linear)
        )
    out: dict[str, tuple[str, tuple[int, int], list[tuple[str, nn.Linear]]]] = {}
    for (type_name, d_in, d_out), members in groups.items():
        base = re.sub(r"\W+", "_", type_name.replace(".*", "")).strip("_") or "linear"
        gname = f"{base}_{d_in}x{d_out}"
        k = 1
        while gname in out:
            k += 1
            gname = f"{base}_{d_in}x{d_out}_{k}"
        out[gname] = (type_name, (d_in, d_out), members)
    return out


@torch.no_grad()
def _reinit_saved(model: nn.Module, saved: list[str], key: int) -> None:
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    for mod_name in saved:
        for sub_name, sub in model.get_submodule(mod_name).named_modules():
            if not isinstance(sub, nn.Linear | nn.Embedding):
                continue
            full = f"{mod_name}.{sub_name}" if sub_name else mod_name
            w = sub.weight
            noise = rng.normal(rng.derive_key(key, _TAG_HEAD, _name_to_int(full)), 0, w.numel())
            w.copy_((noise * std).reshape(w.shape))
            bias = getattr(sub, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()


def _set_submodule(model: nn.Module, full_name: str, module: nn.Module) -> None:
    parent_name, _, child = full_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# --------------------------------------------------------------------------------------
# index lists
# --------------------------------------------------------------------------------------


def _name_to_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _group_key(key: int, type_name: str, d_in: int, d_out: int) -> int:
    return rng.derive_key(key, _TAG_GROUP, _name_to_int(type_name), d_in, d_out)


def _draw(group_key: int, stream: int, population: int, k: int) -> torch.Tensor:
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    return rng.choice(group_key, stream, population, k).to(torch.int64)


def _side_indices(cfg: MoS, group_key: int, stream: int, layer: int, n_layers: int) -> torch.Tensor:
    """One side's index list of one layer: public draw followed by the private block."""
    p, l = cfg.private_rank, cfg.l  # noqa: E741
    public_vectors = (cfg.e - p) * n_layers
    k_vectors = cfg.r - p if cfg.subset_selection else public_vectors
    if cfg.vector_sharding:
        public = _draw(group_key, stream, public_vectors * l, k_vectors * l)
    else:
        vectors = _draw(group_key, stream, public_vectors, k_vectors)
        public = (vectors[:, None] * l + torch.arange(l)).reshape(-1)
    start = public_vectors * l + layer * p * l
    private = torch.arange(start, start + p * l, dtype=torch.int64)
    return torch.cat([public, private])


def _layer_indices(
    cfg: MoS, group_key: int, layer: int, n_layers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    idx_a = _side_indices(cfg, group_key, 1 + 2 * layer, layer, n_layers)
    if not cfg.pair_dissociation:
        return idx_a, idx_a.clone()
    return idx_a, _side_indices(cfg, group_key, 2 + 2 * layer, layer, n_layers)


def mos_layout_digest(model: nn.Module) -> int:
    """64-bit fingerprint of everything about a MoS model that the tensor layout misses.

    Covers the options that change what the pools mean (r, e, p, l, alpha, ffa, the four
    switches), every pool's type and shape, every layer's name and index lists, and a
    one-way fingerprint of the key. Two parties whose trainable tensors have the same
    names and shapes but different index lists (another key or switch) get different
    digests; combine it with :func:`fedtune.layout.layout_hash` (see :func:`mos_layout_hash`).
    """
    pools = _require_pools(model)
    cfg = pools.config
    h = hashlib.blake2b(digest_size=8)
    h.update(_DIGEST_VERSION)
    meaning = {
        k: v
        for k, v in cfg.options().items()
        if k not in ("dropout", "target_modules", "modules_to_save", "reinit_modules_to_save")
    }
    h.update(json.dumps(meaning, sort_keys=True).encode())
    h.update(struct.pack("<Q", pools.key_fingerprint))
    by_pool: dict[int, list[tuple[str, MoSLinear]]] = {}
    for name, layer in mos_linears(model):
        by_pool.setdefault(id(layer.pool), []).append((name, layer))
    for gname, pool in pools.groups.items():
        assert isinstance(pool, MoSPool)
        h.update(f"\0{gname}\0{pool.type_name}\0{pool.d_in}x{pool.d_out}\0".encode())
        for name, layer in by_pool.get(id(pool), []):
            h.update(f"{name}\0{layer.layer}\0{layer.rank}\0".encode())
            for idx in (layer.mos_index_A, layer.mos_index_B):
                h.update(idx.detach().to("cpu", torch.int64).numpy().astype("<i8").tobytes())
    return int.from_bytes(h.digest(), "little")


def mos_layout_hash(model: nn.Module) -> int:
    """``combine_hashes(layout_hash(trainable_state(model)), mos_layout_digest(model))``."""
    return combine_hashes(layout_hash(trainable_state(model)), mos_layout_digest(model))


def check_indices(model: nn.Module, key: int, config: MoS | None = None) -> None:
    """Raise :class:`MoSIndexMismatch` unless ``model``'s index lists come from ``key``.

    Rebuilds every layer's lists from ``key`` and the config stored at attach time; when
    ``config`` is given, the stored config must also equal it. With ``ffa`` the frozen
    A-pool is rebuilt too (it never travels, so it must match by construction).
    """
    pools = _require_pools(model)
    cfg = pools.config
    if config is not None and config.options() != cfg.options():
        diff = {
            k: (v, config.options()[k])
            for k, v in cfg.options().items()
            if config.options()[k] != v
        }
        raise MoSIndexMismatch(
            f"model was attached with another MoS config: (model, expected) = {diff}"
        )
    if rng.derive_key(key, _TAG_KEY_FINGERPRINT) != pools.key_fingerprint:
        raise MoSIndexMismatch("model's MoS index lists were built from another key")
    layers = list(mos_linears(model))
    for pool in pools.groups.values():
        assert isinstance(pool, MoSPool)
        members = [(n, m) for n, m in layers if m.pool is pool]
        gkey = _group_key(key, pool.type_name, pool.d_in, pool.d_out)
        for name, layer in members:
            want_a, want_b = _layer_indices(cfg, gkey, layer.layer, len(members))
            for side, have, want in (
                ("A", layer.mos_index_A, want_a),
                ("B", layer.mos_index_B, want_b),
            ):
                if not torch.equal(have.cpu(), want):
                    raise MoSIndexMismatch(
                        f"MoS {side} index list of layer {name!r} differs from the one built "
                        f"from the key and config (model attached with another key/config?)"
                    )
        if cfg.ffa:
            ref = MoSPool(pool.type_name, pool.A.shape[0], pool.d_in, pool.d_out, pool.l)
            ref.reset_parameters(gkey)
            if not torch.equal(pool.A.detach().cpu().float(), ref.A.detach()):
                raise MoSIndexMismatch(
                    f"frozen A-pool of {pool.type_name!r} differs from the one built from the key"
                )


# --------------------------------------------------------------------------------------
# export and merge
# --------------------------------------------------------------------------------------


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
