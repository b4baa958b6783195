"""Attaching MoS to a model: target matching, grouping into pools, index lists, checks.

Every random draw comes from :mod:`fedtune.rng`, keyed by the attach key, the module type
and its shape, so every party builds the same index lists; :func:`mos_layout_digest`
fingerprints them and :func:`check_indices` rebuilds and compares them.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct

import torch
from torch import nn

from fedtune import rng
from fedtune.adapters.base import trainable_state
from fedtune.adapters.mos.config import MoSConfig, MoSIndexMismatch, TargetGroups
from fedtune.adapters.mos.layer import (
    _TAG_GROUP,
    _TAG_HEAD,
    _TAG_KEY_FINGERPRINT,
    MOS_POOLS_ATTR,
    MoSLinear,
    MoSPool,
    MoSPools,
    _find_pools,
    _require_pools,
    _set_submodule,
    mos_linears,
)
from fedtune.layout import combine_hashes, layout_hash

__all__ = ["attach_mos", "check_indices", "mos_layout_digest", "mos_layout_hash"]

_DIGEST_VERSION = b"fedtune-mos-v1"


# -- attaching ---------------------------------------------------------------------------


def attach_mos(cfg: MoSConfig, model: nn.Module, key: int) -> nn.Module:
    """The work of :meth:`MoS.attach <fedtune.adapters.mos.MoS.attach>` with options ``cfg``."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 1 << 64:
        raise ValueError(f"mos attach key must be an int in [0, 2**64), got {key!r}")
    if _find_pools(model) is not None or any(True for _ in mos_linears(model)):
        raise ValueError("model already has MoS adapters attached")
    targets = _match_targets(model, cfg.target_modules)
    saved = _match_modules_to_save(model, cfg.modules_to_save, set(targets))
    groups = _group_targets(targets)
    cfg._validate_groups(groups)

    for param in model.parameters():
        param.requires_grad_(False)
    for mod_name in saved:
        for param in model.get_submodule(mod_name).parameters():
            param.requires_grad_(True)
    if cfg.reinit_modules_to_save:
        _reinit_saved(model, saved, key)

    pools = MoSPools(cfg, key, saved)
    for gname, (type_name, (d_in, d_out), members) in groups.items():
        n_layers = len(members)
        rank = cfg.layer_rank(n_layers)
        pool = MoSPool(
            type_name, n_shards=cfg.e * n_layers * cfg.l, d_in=d_in, d_out=d_out, l=cfg.l
        )
        pool.to(device=members[0][1].weight.device)
        gkey = _group_key(key, type_name, d_in, d_out)
        pool.reset_parameters(gkey)
        pool.A.requires_grad_(not cfg.ffa)
        pool.B.requires_grad_(True)
        pools.groups[gname] = pool
        for i, (full_name, linear) in enumerate(members):
            idx_a, idx_b = _layer_indices(cfg, gkey, i, n_layers)
            wrapper = MoSLinear(
                linear,
                pool,
                idx_a,
                idx_b,
                rank=rank,
                scaling=cfg.alpha / rank,
                dropout=cfg.dropout,
                layer=i,
            )
            _set_submodule(model, full_name, wrapper)
    model.add_module(MOS_POOLS_ATTR, pools)
    return model


# -- target matching and grouping --------------------------------------------------------


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


def _group_targets(targets: dict[str, nn.Linear]) -> TargetGroups:
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
    out: TargetGroups = {}
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


# -- index lists -------------------------------------------------------------------------


def _name_to_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _group_key(key: int, type_name: str, d_in: int, d_out: int) -> int:
    return rng.derive_key(key, _TAG_GROUP, _name_to_int(type_name), d_in, d_out)


def _draw(group_key: int, stream: int, population: int, k: int) -> torch.Tensor:
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    return rng.choice(group_key, stream, population, k).to(torch.int64)


def _side_indices(
    cfg: MoSConfig, group_key: int, stream: int, layer: int, n_layers: int
) -> torch.Tensor:
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
    cfg: MoSConfig, group_key: int, layer: int, n_layers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    idx_a = _side_indices(cfg, group_key, 1 + 2 * layer, layer, n_layers)
    if not cfg.pair_dissociation:
        return idx_a, idx_a.clone()
    return idx_a, _side_indices(cfg, group_key, 2 + 2 * layer, layer, n_layers)


# -- fingerprints and checks -------------------------------------------------------------


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


def check_indices(model: nn.Module, key: int, config: MoSConfig | None = None) -> None:
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
