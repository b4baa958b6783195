"""``factor-mode = "exact"``: FedEx-LoRA residual folding for LoRA and MoS.

Paper: Singhal, Ponkshe and Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models" (arXiv 2410.09432, ACL 2025): the residual
error term added to the frozen pre-trained weight.

Averaging the factors of K clients separately (FedIT, our ``factors`` mode) gives the
product of the means, not the mean of the products::

    s · B̄ Ā  ≠  s · Σ_k w_k B_k A_k,     Ā = Σ_k w_k A_k,  B̄ = Σ_k w_k B_k,  Σ_k w_k = 1.

FedEx-LoRA keeps the averaged factors as the next global adapter and folds the difference
into the frozen base weight of every adapted layer::

    R_{t+1} = R_t + s · (Σ_k w_k B_k A_k − B̄ Ā)                       (the residual)
    W_{t+1} = W_0 + R_{t+1} + s · B̄ Ā  =  Σ_k w_k (W_0 + R_t + s · B_k A_k)

so the global model's weight is exactly the weighted average of the clients' weights
(``s = alpha / r``, the LoRA scaling). ``R`` is dense (``d_out × d_in`` per adapted layer) and
accumulates over rounds; clients receive it with every train message and set their frozen
weight to ``W_0 + R``.

* **Which factors.** ``A_k = A_t + Δ̂A_k`` and ``B_k = B_t + Δ̂B_k`` with ``Δ̂`` the *decoded*
  payload. With a lossless codec (``dense``) these are the clients' true factors; with a
  projection codec (gaussian, srht, …) or quantization the products are exact for the decoded
  factors, not for the ones the client trained: exactness is about aggregation, not about
  compression.
* **MoS.** A MoS layer's ``A`` and ``B`` are gathers from pools shared across layers
  (:meth:`fedtune.adapters.mos.MoSLinear.factors`); gathering is linear, so averaging the
  pools and then gathering gives ``Ā``/``B̄`` of every layer, and the same per-layer formula
  applies to the materialised factors.
* **Linear merger only.** :meth:`ExactResidual.update` uses the *actual* new global factors,
  so ``W_{t+1} = Σ_k w_k W_k`` whatever produced them: with a nonlinear merger (TIES, median,
  …) or a server optimizer the residual would silently undo their effect on the adapted
  weights (leaving it only on the other tensors, e.g. the head). :func:`fedtune.config.parse`
  therefore allows only mergers that *are* the weighted mean (FedAvg, task arithmetic with
  scale 1) and server-opt ``none``; then ``R`` is exactly the paper's ``Σ w B A − B̄ Ā`` term.
* **What is exact.** The *weights* of every adapted layer. The model's output equals the
  weighted average of the client models' outputs only where the output is linear in those
  weights (one adapted layer feeding a linear read-out, as in the tests); through a deep
  network it is the model of weight-space FedAvg of full fine-tuning, as in the paper.

Nothing here imports Flower; :mod:`fedtune.fl.strategy` calls :class:`ExactResidual`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "RESIDUAL_FILE",
    "ExactLayer",
    "ExactResidual",
    "add_residual_to_base",
    "effective_weights",
    "exact_layers",
    "load_residual",
    "residual_increment",
    "save_residual",
    "set_residual",
]

Tensors = dict[str, torch.Tensor]

#: file written next to the exported PEFT adapter: per-layer residuals keyed by base weight name
RESIDUAL_FILE = "base_residual.safetensors"

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ExactLayer:
    """Where one adapted layer's factors live in the trainable state, and its frozen weight.

    ``name`` is the weight's name in the *plain* base model (``...query.weight``): the key of
    the residual, so ``base.state_dict()[name] += R`` works without PEFT or MoS.
    ``module`` is the adapted module's path in the adapted model. For LoRA ``a_key``/``b_key``
    are the ``lora_A``/``lora_B`` weights and the indices are ``None``; for MoS they are the
    pools and ``index_a``/``index_b`` the layer's gather lists.
    """

    name: str
    module: str
    a_key: str
    b_key: str
    rank: int
    scaling: float
    d_out: int
    d_in: int
    index_a: torch.Tensor | None = None
    index_b: torch.Tensor | None = None

    def factors(self, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``A`` (r, d_in) and ``B`` (d_out, r) read from ``state`` (fp32)."""
        a, b = state[self.a_key].float(), state[self.b_key].float()
        if self.index_a is None or self.index_b is None:
            return a, b
        # MoS: the same gather as MoSLinear.factors, on plain tensors
        a = a[self.index_a.to(a.device)].reshape(self.rank, self.d_in)
        b = b[self.index_b.to(b.device)].reshape(self.rank, self.d_out).t()
        return a, b

    def delta(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``s · B A`` of ``state`` with the weight's shape (d_out, d_in)."""
        a, b = self.factors(state)
        return (b @ a) * self.scaling


def exact_layers(model: nn.Module) -> list[ExactLayer]:
    """Every adapted layer of a PEFT-LoRA or MoS model, in module order.

    Raises ValueError when the model has no trainable factors (e.g. FFA froze ``A``).
    """
    from peft.tuners.lora import LoraLayer

    from fedtune.adapters.mos import mos_linears

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    name_of = {id(p): n for n, p in model.named_parameters()}
    out: list[ExactLayer] = []
    for mod_name, m in mos_linears(model):
        out.append(
            ExactLayer(
                name=f"{_plain(mod_name)}.weight",
                module=mod_name,
                a_key=name_of[id(m.pool.A)],
                b_key=name_of[id(m.pool.B)],
                rank=m.rank,
                scaling=float(m.scaling),
                d_out=m.out_features,
                d_in=m.in_features,
                index_a=m.mos_index_A.detach().cpu(),
                index_b=m.mos_index_B.detach().cpu(),
            )
        )
    for mod_name, m in model.named_modules():
        if not isinstance(m, LoraLayer) or "default" not in m.lora_A:
            continue
        a_w, b_w = m.lora_A["default"].weight, m.lora_B["default"].weight
        assert isinstance(a_w, torch.Tensor) and isinstance(b_w, torch.Tensor)
        out.append(
            ExactLayer(
                name=f"{_plain(mod_name)}.weight",
                module=mod_name,
                a_key=name_of[id(a_w)],
                b_key=name_of[id(b_w)],
                rank=int(a_w.shape[0]),
                scaling=float(m.scaling["default"]),
                d_out=int(b_w.shape[0]),
                d_in=int(a_w.shape[1]),
            )
        )
    frozen = [x.name for x in out if x.a_key not in trainable or x.b_key not in trainable]
    if not out or frozen:
        raise ValueError(
            "factor-mode 'exact' needs trainable A and B factors in every adapted layer; "
            f"found {len(out)} adapted layers, frozen factors in {frozen[:3]}"
        )
    return out


def _plain(module_name: str) -> str:
    """The module's name in the base model: PEFT's prefix and no ``base_layer``."""
    name = module_name.removeprefix(_PEFT_PREFIX)
    return name.removesuffix(".base_layer")


def _frozen_weight(model: nn.Module, layer: ExactLayer) -> torch.Tensor:
    """The frozen base ``nn.Linear`` weight of ``layer`` (PEFT and MoS both wrap it)."""
    m = model.get_submodule(layer.module)
    base = getattr(m, "base_layer", m)
    w = base.weight
    assert isinstance(w, torch.Tensor)
    return w


# ----------------------------------------------------------------------------- server side


def residual_increment(
    layers: Sequence[ExactLayer],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    new_state: Mapping[str, torch.Tensor],
) -> Tensors:
    """Per layer ``s · (Σ_k w_k B_k A_k − B_new A_new)`` with ``w`` normalised to sum 1.

    ``new_state`` is the next global adapter (``Ā``, ``B̄`` for a linear merger). One GEMM per
    layer: ``[w_1 B_1 … w_K B_K  −B_new] @ [A_1; …; A_K; A_new]`` (inner dim (K+1)·r), in
    float64 so the difference of two nearly equal products keeps its digits.
    """
    if len(client_states) != len(weights) or not client_states:
        raise ValueError(f"got {len(client_states)} client states and {len(weights)} weights")
    total = math.fsum(float(w) for w in weights)
    if not (total > 0 and math.isfinite(total)):
        raise ValueError(f"weights must sum to a positive finite number, got {total}")
    norm = [float(w) / total for w in weights]
    out: Tensors = {}
    for layer in layers:
        lefts, rights = [], []
        for w, st in zip(norm, client_states, strict=True):
            a, b = layer.factors(st)
            lefts.append(b.double() * w)
            rights.append(a.double())
        a_new, b_new = layer.factors(new_state)
        lefts.append(-b_new.double())
        rights.append(a_new.double())
        prod = torch.cat(lefts, dim=1) @ torch.cat(rights, dim=0)
        out[layer.name] = (prod * layer.scaling).float()
    return out


class ExactResidual:
    """The server's running per-layer residual ``R`` (FedEx-LoRA), updated once per round."""

    def __init__(self, layers: Sequence[ExactLayer]) -> None:
        self.layers = list(layers)
        self.residual: Tensors = {}

    def update(
        self,
        current: Mapping[str, torch.Tensor],
        deltas: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        new_state: Mapping[str, torch.Tensor],
    ) -> float:
        """Fold this round into ``R``; returns the increment's Frobenius norm (for logs).

        ``deltas`` are the decoded (and, if configured, clipped) client updates exactly as
        they went into the merger: client ``k``'s factors are ``current + deltas[k]``.
        """
        keys = {x.a_key for x in self.layers} | {x.b_key for x in self.layers}
        states = [{k: current[k] + d[k] for k in keys} for d in deltas]
        inc = residual_increment(self.layers, states, weights, new_state)
        for name, r in inc.items():
            self.residual[name] = self.residual[name] + r if name in self.residual else r
        return math.sqrt(sum(float(r.double().pow(2).sum()) for r in inc.values()))

    def downlink_floats(self) -> int:
        """Floats a train message carries for ``R``: ``Σ_layers d_out · d_in``."""
        return sum(x.d_out * x.d_in for x in self.layers)

    def state_dict(self) -> Tensors:
        return dict(self.residual)

    def load_state_dict(self, residual: Mapping[str, torch.Tensor]) -> None:
        known = {x.name: (x.d_out, x.d_in) for x in self.layers}
        for name, r in residual.items():
            if name not in known or tuple(r.shape) != known[name]:
                raise ValueError(
                    f"residual {name!r} with shape {tuple(r.shape)} does not match the "
                    "adapted layers of this model"
                )
        self.residual = {k: v.float() for k, v in residual.items()}


# ----------------------------------------------------------------------------- model side

# model -> original frozen weights W_0 (by residual name), kept outside the module tree so
# that state_dict / PEFT save / layout hashes do not change
_ORIGINAL: weakref.WeakKeyDictionary[nn.Module, Tensors] = weakref.WeakKeyDictionary()
_LAYERS: weakref.WeakKeyDictionary[nn.Module, list[ExactLayer]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def set_residual(model: nn.Module, residual: Mapping[str, torch.Tensor] | None) -> None:
    """Set every adapted layer's frozen weight to ``W_0 + R`` (``W_0`` where ``R`` is absent).

    Absolute, not incremental: a cached model used for several rounds, clients or the
    server's evaluation never accumulates stale residuals. ``W_0`` is remembered the first
    time this is called on ``model``.
    """
    residual = residual or {}
    if model not in _LAYERS:
        _LAYERS[model] = exact_layers(model)
        _ORIGINAL[model] = {
            x.name: _frozen_weight(model, x).detach().clone() for x in _LAYERS[model]
        }
    layers = {x.name: x for x in _LAYERS[model]}
    unknown = sorted(set(residual) - set(layers))
    if unknown:
        raise ValueError(f"residual for unknown layer(s) {unknown[:3]}")
    for name, layer in layers.items():
        w = _frozen_weight(model, layer)
        w0 = _ORIGINAL[model][name]
        if name in residual:
            r = residual[name].to(device=w.device, dtype=torch.float32)
            w.copy_((w0.float() + r).to(w.dtype))
        else:
            w.copy_(w0)


def effective_weights(
    layers: Sequence[ExactLayer],
    base: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
) -> Tensors:
    """``W_0 + R + s · B A`` per layer (``base`` keyed by the plain weight names)."""
    out: Tensors = {}
    for x in layers:
        w = base[x.name].float() + x.delta(state)
        if x.name in residual:
            w = w + residual[x.name].float()
        out[x.name] = w
    return out


def save_residual(out_dir: Path | str, residual: Mapping[str, torch.Tensor]) -> Path:
    """Write ``out_dir/base_residual.safetensors`` (fp32, keys = plain base weight names)."""
    from safetensors.torch import save_file

    path = Path(out_dir) / RESIDUAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in residual.items()},
        str(path),
        metadata={"format": "pt", "fedtune": "FedEx-LoRA residual: add to the base weights"},
    )
    return path


def load_residual(path: Path | str) -> Tensors:
    """Read a residual file (or the one inside an exported adapter folder)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / RESIDUAL_FILE
    return dict(load_file(str(p)))


@torch.no_grad()
def add_residual_to_base(base: nn.Module, residual: Mapping[str, torch.Tensor]) -> nn.Module:
    """Add ``R`` to the plain base model's weights in place (before ``PeftModel.from_pretrained``).

    Loading an exact-mode run for serving::

        base = AutoModelForSequenceClassification.from_pretrained(...)
        add_residual_to_base(base, load_residual(run_dir / "adapter"))
        model = PeftModel.from_pretrained(base, run_dir / "adapter")
    """
    params = dict(base.named_parameters())
    missing = sorted(set(residual) - set(params))
    if missing:
        raise ValueError(f"base model has no weight(s) {missing[:3]} for the residual")
    for name, r in residual.items():
        p = params[name]
        if tuple(p.shape) != tuple(r.shape):
            raise ValueError(
                f"residual {name!r} has shape {tuple(r.shape)}, weight {tuple(p.shape)}"
            )
        p.copy_((p.float() + r.to(p.device, torch.float32)).to(p.dtype))
    return base
