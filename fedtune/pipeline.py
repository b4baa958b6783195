"""What a client does in a round and how the server evaluates, composed from the parts.

The Flower apps in ``clients/`` and ``server/`` are thin: they read a message, call one
function here, and reply. Nothing here imports Flower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from fedtune import adapters, codecs, rng
from fedtune.config import Config
from fedtune.data import Federation, build_federation
from fedtune.evaluate import evaluate_classifier, evaluate_lm
from fedtune.models import load_model, resolve_device
from fedtune.train import collate_for, eval_batches, shuffled_batches, train_local

Tensors = dict[str, torch.Tensor]

# fixed stream tags so different uses of the run seed never share a key
_ADAPTER_INIT, _CLIENT_DATA, _ATTACK = 0xADA, 0xDA7A, 0xBAD


def adapter_key(cfg: Config) -> int:
    """Key for the adapter's random init (A matrices, MoS index lists, task head)."""
    return rng.derive_key(cfg.seed, _ADAPTER_INIT)


def build_adapter(cfg: Config) -> Any:
    """The configured adapter method with its options from ``cfg``."""
    if cfg.adapter == "lora":
        return adapters.get(
            "lora",
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=cfg.targets,
            task=cfg.task,
            ffa=cfg.factor_mode == "ffa",
        )
    if cfg.adapter == "mos":
        from fedtune.config import _MOS_SWITCHES

        off = {_MOS_SWITCHES[x.strip()] for x in cfg.mos_disable.split(",") if x.strip()}
        return adapters.get(
            "mos",
            r=cfg.mos_r,
            e=cfg.mos_e,
            p=cfg.mos_p,
            l=cfg.mos_l,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=cfg.targets,
            modules_to_save=["classifier"] if cfg.task == "classification" else None,
            ffa=cfg.factor_mode == "ffa",
            **{name: False for name in off},
        )
    raise ValueError(f"unknown adapter {cfg.adapter!r}; allowed: {', '.join(adapters.names())}")


def build_codec(cfg: Config, *, salt: int = 0) -> Any:
    """The configured codec; ``spsa`` takes the client's learning rate unless ``codec-lr`` is set.

    ``salt`` (see :func:`layout_salt`) goes into the layout hash of every payload; whoever
    encodes or decodes real payloads must pass it, only option validation may leave it 0.
    """
    opts = dict(cfg.codec_options)
    if cfg.codec == "spsa":
        opts.setdefault("lr", cfg.lr)
    codec = codecs.get(cfg.codec, **opts)
    codec.layout_salt = salt
    return codec


def layout_salt(cfg: Config) -> int:
    """What the wire layout hash must cover beyond tensor names and shapes: for MoS the
    digest of the pools' index lists (derived from the run seed), so a client and a server
    that disagree about them (another seed, switch or shard setting) fail loudly instead of
    merging shards that mean different things. 0 for LoRA."""
    if cfg.adapter != "mos":
        return 0
    from fedtune.adapters.mos import mos_layout_digest

    return mos_layout_digest(workbench(cfg, federation(cfg)).model)


@dataclass
class Workbench:
    """A base model with the adapter attached, its tokenizer, and the adapter method."""

    model: nn.Module
    tokenizer: Any
    adapter: Any
    device: torch.device
    initial: Tensors  # the keyed initial trainable state


@lru_cache(maxsize=2)
def _workbench(cfg: Config, num_labels: int) -> Workbench:
    base, tok = load_model(cfg.model, cfg.task, num_labels)
    adapter = build_adapter(cfg)
    model = adapter.attach(base, adapter_key(cfg))
    device = resolve_device(cfg.device)
    model.to(device)
    return Workbench(model, tok, adapter, device, adapters.trainable_state(model))


def workbench(cfg: Config, fed: Federation) -> Workbench:
    """Cached per process: Ray reuses actors, so a simulated client loads its model once."""
    return _workbench(cfg, fed.num_labels)


def federation(cfg: Config) -> Federation:
    return build_federation(cfg)


def client_round(
    cfg: Config,
    partition_id: int,
    global_state: Tensors,
    *,
    key: int,
    server_round: int,
    slot: int,
    error_feedback: codecs.ErrorFeedback | None = None,
    residual: Tensors | None = None,
) -> tuple[bytes, dict[str, float]]:
    """Train locally from ``global_state`` and return (encoded update, metrics).

    First-order AdamW steps, then the configured codec encodes Δ = θ_local − θ_global
    (Ferret: local steps, then a seeded projection); with ``codec='spsa'`` the local steps
    are zeroth-order (MeZO) and the payload is one scalar per step. ``error_feedback``
    (client-side memory) adds what earlier projections lost and keeps what this one loses.
    ``residual`` (``factor-mode='exact'``, FedEx-LoRA) is added to the frozen base weights
    before training, see :func:`apply_residual`.
    """
    fed = federation(cfg)
    wb = workbench(cfg, fed)
    adapters.load_trainable_state(wb.model, global_state)
    apply_residual(cfg, wb, residual)
    data = fed.client(partition_id)
    data_key = rng.derive_key(cfg.seed, _CLIENT_DATA, server_round, partition_id)
    collate = collate_for(cfg.task, wb.tokenizer, cfg.max_length)
    batches = shuffled_batches(data, collate, cfg.batch_size, data_key)
    codec = build_codec(cfg, salt=layout_salt(cfg))
    if cfg.codec == "spsa":
        return _zo_round(cfg, wb, codec, batches, global_state, key, server_round, slot, len(data))
    result = train_local(
        wb.model,
        batches,
        steps=cfg.local_steps,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        device=wb.device,
        dropout_key=data_key,
    )
    new_state = adapters.trainable_state(wb.model)
    delta = {k: new_state[k] - global_state[k] for k in global_state}
    if cfg.attack != "none" and partition_id in attackers(cfg, len(fed.clients)):
        delta = corrupt(delta, cfg.attack, cfg.attack_scale, key)
    if error_feedback is not None:
        delta = error_feedback.apply(delta)
    payload = codec.encode(delta, key, round=server_round, slot=slot)
    if error_feedback is not None:
        sent = codec.decode(payload, like=global_state, key=key, round=server_round, slot=slot)
        error_feedback.update(delta, sent)
    metrics = {
        "train-loss": result.loss,
        "num-examples": float(result.num_examples),
        "local-steps": float(result.steps),
        "payload-bytes": float(len(payload)),
        "client-examples": float(len(data)),
    }
    return payload, metrics


def attackers(cfg: Config, num_clients: int) -> set[int]:
    """Partition ids of the simulated malicious clients: a keyed, fixed ``attack-fraction``."""
    k = round(cfg.attack_fraction * num_clients)
    if k == 0:
        return set()
    return set(rng.choice(rng.derive_key(cfg.seed, _ATTACK), 0, num_clients, k).tolist())


def corrupt(delta: Tensors, how: str, scale: float, key: int) -> Tensors:
    """A malicious update: sign-flipped and scaled, scaled, or replaced by keyed noise of
    ``scale`` times the honest norm (Fang et al. 2020 / Blanchard et al. 2017 threat models)."""
    if how == "sign-flip":
        return {k: -scale * v for k, v in delta.items()}
    if how == "scale":
        return {k: scale * v for k, v in delta.items()}
    if how == "noise":
        norm = sum(float(v.pow(2).sum()) for v in delta.values()) ** 0.5
        out = {
            k: rng.normal(key, i, v.numel()).view_as(v) for i, (k, v) in enumerate(delta.items())
        }
        nn_ = sum(float(v.pow(2).sum()) for v in out.values()) ** 0.5 or 1.0
        return {k: v * (scale * norm / nn_) for k, v in out.items()}
    raise ValueError(f"unknown attack {how!r}")


def _zo_round(
    cfg: Config,
    wb: Workbench,
    codec: Any,
    batches: Any,
    global_state: Tensors,
    key: int,
    server_round: int,
    slot: int,
    n_data: int,
) -> tuple[bytes, dict[str, float]]:
    """MeZO local steps (Malladi et al. 2023, Alg. 1): the model is only evaluated, never
    back-propagated; directions regenerate from ``key`` so the server can replay them."""
    from fedtune.codecs import ZOUpdate
    from fedtune.train import to_device
    from fedtune.zo import zo_train

    params = {n: p for n, p in wb.model.named_parameters() if p.requires_grad}
    wb.model.eval()  # both loss evaluations of a step must see the same function (no dropout)

    def loss_fn(batch: Any) -> float:
        return float(wb.model(**to_device(batch, wb.device)).loss)

    with torch.no_grad():
        scalars, losses = zo_train(
            params,
            loss_fn,
            batches,
            steps=cfg.local_steps,
            lr=codec.lr,
            eps=cfg.zo_eps,
            key=key,
            scalar_bits=codec.coef_bits,
        )
    payload = codec.encode(ZOUpdate(scalars, like=global_state), key, round=server_round, slot=slot)
    return payload, {
        "train-loss": sum(losses) / max(len(losses), 1),
        "num-examples": float(cfg.local_steps * cfg.batch_size),
        "local-steps": float(cfg.local_steps),
        "payload-bytes": float(len(payload)),
        "client-examples": float(n_data),
    }


def apply_residual(cfg: Config, wb: Workbench, residual: Tensors | None) -> None:
    """``factor-mode='exact'``: set the adapted layers' frozen weights to ``W_0 + residual``.

    Absolute (``W_0`` when ``residual`` is None or empty), because the workbench is cached
    and reused across rounds, clients and server-side evaluation. No-op in other modes.
    """
    if cfg.factor_mode == "exact":
        from fedtune.adapters import exact

        exact.set_residual(wb.model, residual)


def evaluate_state(
    cfg: Config,
    state: Tensors,
    *,
    on: str = "test",
    partition_id: int = -1,
    residual: Tensors | None = None,
) -> dict[str, float]:
    """Evaluate the model with adapter ``state`` (and, in exact mode, the base-weight
    ``residual``) on the held-out test set (or a client's data)."""
    fed = federation(cfg)
    wb = workbench(cfg, fed)
    adapters.load_trainable_state(wb.model, state)
    apply_residual(cfg, wb, residual)
    ds = fed.test if on == "test" else fed.client(partition_id)
    collate = collate_for(cfg.task, wb.tokenizer, cfg.max_length)
    batches = eval_batches(ds, collate, cfg.eval_batch_size)
    if cfg.task == "classification":
        return evaluate_classifier(wb.model, batches, wb.device)
    return evaluate_lm(wb.model, batches, wb.device)


def majority_baseline(fed: Federation) -> float:
    """Accuracy of always predicting the most common test label (classification only)."""
    if fed.task != "classification":
        return math.nan
    labels = fed.test["label"]
    return max(labels.count(c) for c in set(labels)) / len(labels)


def quiet_libraries() -> None:
    """Silence per-call progress bars and load reports of datasets / transformers (apps only)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def generate(
    cfg: Config,
    state: Tensors,
    n: int = 3,
    max_new_tokens: int = 32,
    residual: Tensors | None = None,
) -> list[tuple[str, str]]:
    """Greedy answers of the model with adapter ``state`` to the first ``n`` held-out prompts."""
    from fedtune.lm import generate_samples

    fed = federation(cfg)
    wb = workbench(cfg, fed)
    adapters.load_trainable_state(wb.model, state)
    apply_residual(cfg, wb, residual)
    prompts = [str(p) for p in fed.test["prompt"][:n]]
    return list(
        zip(prompts, generate_samples(wb.model, wb.tokenizer, prompts, max_new_tokens), strict=True)
    )
