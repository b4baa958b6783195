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

from fedtune import adapters, codecs, parts, rng
from fedtune.config import Config
from fedtune.data import Federation, build_federation
from fedtune.evaluate import evaluate_classifier, evaluate_lm
from fedtune.models import load_model, resolve_device
from fedtune.round import ServerRound
from fedtune.train import collate_for, eval_batches, shuffled_batches
from fedtune.trainers import LocalJob, LocalSpec, lr_scale

Tensors = dict[str, torch.Tensor]

# fixed stream tags so different uses of the run seed never share a key
_ADAPTER_INIT, _CLIENT_DATA = 0xADA, 0xDA7A


def adapter_key(cfg: Config) -> int:
    """Key for the adapter's random init (A matrices, MoS index lists, task head)."""
    return rng.derive_key(cfg.seed, _ADAPTER_INIT)


def layout_salt(cfg: Config) -> int:
    """What the wire layout hash must cover beyond tensor names and shapes, as the adapter
    declares it (``adapter.layout_salt(model)``): for MoS the digest of the pools' index lists
    (derived from the run seed), so a client and a server that disagree about them fail
    loudly instead of merging shards that mean different things. 0 when the adapter has none."""
    wb = workbench(cfg, federation(cfg))
    salt = getattr(wb.adapter, "layout_salt", None)
    return int(salt(wb.model)) if salt is not None else 0


def codec(cfg: Config) -> Any:
    """The run's codec with the layout salt real payloads need (encode and decode)."""
    return parts.codec(cfg, salt=layout_salt(cfg))


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
    adapter = parts.adapter(cfg)
    model = adapter.attach(base, adapter_key(cfg))
    device = resolve_device(cfg.device)
    model.to(device)
    return Workbench(model, tok, adapter, device, adapters.trainable_state(model))


def workbench(cfg: Config, fed: Federation) -> Workbench:
    """Cached per process: Ray reuses actors, so a simulated client loads its model once."""
    return _workbench(cfg, fed.num_labels)


def federation(cfg: Config) -> Federation:
    return build_federation(cfg)


def local_spec(cfg: Config, server_round: int = 1) -> LocalSpec:
    """The local-training knobs of round ``server_round`` (the lr schedule is per round)."""
    return LocalSpec(
        steps=cfg.local_steps,
        lr=cfg.lr,
        lr_scale=lr_scale(cfg.lr_schedule, server_round, cfg.num_rounds, cfg.lr_final),
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        batch_size=cfg.batch_size,
        zo_eps=cfg.zo_eps,
    )


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

    The configured trainer (:mod:`fedtune.trainers`, chosen by ``trainer``) trains; the codec
    encodes its update (Ferret: local steps, then a seeded projection; zeroth-order: one
    scalar per step). ``error_feedback`` (client-side memory) adds what earlier projections
    lost and keeps what this one loses. ``residual`` (``factor-mode='exact'``, FedEx-LoRA) is
    added to the frozen base weights before training, see :func:`apply_residual`. The same
    function serves the ClientApp and the in-process simulator.
    """
    fed = federation(cfg)
    wb = workbench(cfg, fed)
    adapters.load_trainable_state(wb.model, global_state)
    apply_residual(cfg, wb, residual)
    data = fed.client(partition_id)
    data_key = rng.derive_key(cfg.seed, _CLIENT_DATA, server_round, partition_id)
    collate = collate_for(cfg.task, wb.tokenizer, cfg.max_length)
    batches = shuffled_batches(data, collate, cfg.batch_size, data_key)
    enc = codec(cfg)
    train = parts.trainer(cfg, partition_id, len(fed.clients))
    spec = local_spec(cfg, server_round)
    job = LocalJob(wb.model, batches, global_state, spec, wb.device, key, data_key, enc)
    result = train(job)
    update = result.update
    if error_feedback is not None and isinstance(update, dict):
        update = error_feedback.apply(update)
    payload = enc.encode(update, key, round=server_round, slot=slot)
    if error_feedback is not None and isinstance(update, dict):
        sent = enc.decode(payload, like=global_state, key=key, round=server_round, slot=slot)
        error_feedback.update(update, sent)
    return payload, {
        **result.metrics,
        "payload-bytes": float(len(payload)),
        "client-examples": float(len(data)),
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


def server_round(cfg: Config) -> ServerRound:
    """The run's server round; in ``factor-mode='exact'`` with the FedEx-LoRA residual of the
    adapted layers of this process's model."""
    ex = None
    if cfg.factor_mode == "exact":
        from fedtune.adapters import exact

        ex = exact.ExactResidual(exact.exact_layers(workbench(cfg, federation(cfg)).model))
    if cfg.dp == "none" and cfg.secagg == "none":
        return parts.server_round(cfg, exact=ex)
    fed = federation(cfg)  # DP and SecAgg act on the codec's vectors; DP counts the clients
    return parts.server_round(
        cfg,
        exact=ex,
        codec=codec(cfg),
        like=workbench(cfg, fed).initial,
        num_clients=len(fed.clients),
    )
