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

**The package** (each module imports only those above it in this list):

==================  ===========================================================================
``config``          :class:`MoSConfig` (the options and their checks), :class:`MoSIndexMismatch`
``layer``           :class:`MoSPool`, :class:`MoSPools`, :class:`MoSLinear`, :func:`mos_linears`
``injection``       target matching, attaching, index lists, :func:`mos_layout_digest`,
                    :func:`mos_layout_hash`, :func:`check_indices`
``export``          :func:`export_peft`, :func:`merge_into_base`
``__init__``        :class:`MoS`, the registered adapter: :class:`MoSConfig` bound to
                    ``injection`` and ``export``
==================  ===========================================================================
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from fedtune.adapters.base import REGISTRY
from fedtune.adapters.base import trainable_state as trainable_state
from fedtune.adapters.mos.config import MoSConfig, MoSIndexMismatch
from fedtune.adapters.mos.config import _as_names as _as_names
from fedtune.adapters.mos.config import _check_int as _check_int
from fedtune.adapters.mos.export import export_peft, merge_into_base
from fedtune.adapters.mos.injection import _DIGEST_VERSION as _DIGEST_VERSION
from fedtune.adapters.mos.injection import _LAYER_NUMBER as _LAYER_NUMBER
from fedtune.adapters.mos.injection import _default_targets as _default_targets
from fedtune.adapters.mos.injection import _draw as _draw
from fedtune.adapters.mos.injection import _group_key as _group_key
from fedtune.adapters.mos.injection import _group_targets as _group_targets
from fedtune.adapters.mos.injection import _layer_indices as _layer_indices
from fedtune.adapters.mos.injection import _match_modules_to_save as _match_modules_to_save
from fedtune.adapters.mos.injection import _match_targets as _match_targets
from fedtune.adapters.mos.injection import _name_to_int as _name_to_int
from fedtune.adapters.mos.injection import _reinit_saved as _reinit_saved
from fedtune.adapters.mos.injection import _side_indices as _side_indices
from fedtune.adapters.mos.injection import _suffix_match as _suffix_match
from fedtune.adapters.mos.injection import (
    attach_mos,
    check_indices,
    mos_layout_digest,
    mos_layout_hash,
)
from fedtune.adapters.mos.layer import _STREAM_A_INIT as _STREAM_A_INIT
from fedtune.adapters.mos.layer import _TAG_GROUP as _TAG_GROUP
from fedtune.adapters.mos.layer import _TAG_HEAD as _TAG_HEAD
from fedtune.adapters.mos.layer import _TAG_KEY_FINGERPRINT as _TAG_KEY_FINGERPRINT
from fedtune.adapters.mos.layer import (
    MOS_POOLS_ATTR,
    MoSLinear,
    MoSPool,
    MoSPools,
    mos_linears,
)
from fedtune.adapters.mos.layer import _find_pools as _find_pools
from fedtune.adapters.mos.layer import _require_pools as _require_pools
from fedtune.adapters.mos.layer import _set_submodule as _set_submodule
from fedtune.layout import combine_hashes
from fedtune.layout import layout_hash as layout_hash

# The private helpers and constants imported ``X as X`` above are re-exported only so that
# every name of the former single module ``fedtune/adapters/mos.py`` stays importable here.
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


@REGISTRY.register("mos")
@dataclasses.dataclass
class MoS(MoSConfig):
    """MoS adapter factory (Wang et al., ICLR 2025); options are validated on construction.

    The options are those of :class:`MoSConfig` (``r``, ``e``, ``p``, ``l``, ``alpha``,
    ...); this class adds the adapter protocol of :mod:`fedtune.adapters.base`, binding the
    config to ``injection`` and ``export`` the way PEFT's ``register_peft_method`` binds a
    tuner's config class to its model class.
    """

    def attach(self, model: nn.Module, key: int) -> nn.Module:
        """Freeze ``model``, wrap its target Linears with MoS, initialise from ``key``.

        Modifies ``model`` in place and returns it. Pools live in the submodule
        ``model.mos_pools`` (registered last, so they come last in ``named_parameters``);
        every random draw (A-pool values, index lists) comes from :mod:`fedtune.rng`.
        """
        return attach_mos(self, model, key)

    def export_peft(self, model: nn.Module, out_dir: Path | str) -> None:
        """Write the materialised adapter as plain PEFT LoRA (see :func:`export_peft`)."""
        export_peft(model, out_dir)

    def check_indices(self, model: nn.Module, key: int) -> None:
        """:func:`check_indices` with this config as the expected one."""
        check_indices(model, key, config=self)

    def layout_salt(self, model: nn.Module) -> int:
        """What the wire layout hash covers beyond names and shapes: the digest of the pools'
        index lists, so parties that disagree about them fail loudly (docs/downlink.md)."""
        return mos_layout_digest(model)

    @classmethod
    def from_config(cls, cfg: Any, **options: Any) -> MoS:
        """From the run config's named keys (``mos-r``, ``mos-e``, ``mos-p``, ``mos-l``,
        ``mos-disable``, ``lora-alpha``, ``lora-dropout``, ``target-modules``, ``task``,
        ``factor-mode='ffa'``); ``adapter-*`` options win."""
        from fedtune.config import MOS_SWITCHES

        off = {MOS_SWITCHES[x.strip()] for x in cfg.mos_disable.split(",") if x.strip()}
        named: dict[str, Any] = {
            "r": cfg.mos_r,
            "e": cfg.mos_e,
            "p": cfg.mos_p,
            "l": cfg.mos_l,
            "alpha": cfg.lora_alpha,
            "dropout": cfg.lora_dropout,
            "target_modules": cfg.targets,
            "modules_to_save": ["classifier"] if cfg.task == "classification" else None,
            "ffa": cfg.factor_mode == "ffa",
            **{name: False for name in off},
        }
        return cls(**{**named, **options})
