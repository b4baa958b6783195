"""The options of the MoS adapter and their checks (notation: the package docstring).

The bottom of the package: it imports nothing else from it. :class:`MoSConfig` holds and
validates the options; the registered adapter :class:`fedtune.adapters.mos.MoS` adds the
adapter protocol (``attach``, ``export_peft``, ``check_indices``) on top of it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["MoSConfig", "MoSIndexMismatch", "TargetGroups"]

TargetGroups = dict[str, tuple[str, tuple[int, int], list[tuple[str, nn.Linear]]]]
"""Pool key -> (type name, (d_in, d_out), layers in module order); built at attach time."""


class MoSIndexMismatch(ValueError):
    """A model's MoS index lists were not built from the expected key and config."""


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


@dataclasses.dataclass
class MoSConfig:
    """MoS options (Wang et al., ICLR 2025); validated on construction.

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
            four differentiation strategies (package docstring), on by default.
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

    # -- checks against a model -----------------------------------------------------------

    def _validate_groups(self, groups: TargetGroups) -> None:
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
