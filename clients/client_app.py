"""fedtune ClientApp: read the message -> train / evaluate with fedtune -> reply."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune import codecs, faults, parts, pipeline
from fedtune.config import Config, Scalar
from fedtune.fl import downlink
from fedtune.fl.records import (
    config_int,
    key_from_config,
    metrics_record,
    payload_to_record,
    record_to_state,
    state_to_record,
    train_inputs,
    train_residual,
)
from fedtune.fl.secagg import is_secure, maybe_secaggplus, secure_reply

# SecAgg+ train messages go through Flower's secaggplus_mod; all others reach the app as is
app = ClientApp(mods=[maybe_secaggplus])
APP_DIR = Path(__file__).resolve().parents[1]  # the unpacked Flower app: plug-in paths start here


def _partition_id(context: Context) -> int:
    """Simulation sets partition-id; a deployed SuperNode gets it from --node-config."""
    pid = context.node_config.get("partition-id")
    if not isinstance(pid, int):
        raise ValueError(
            "node config lacks an integer 'partition-id' (--node-config \"partition-id=0\")"
        )
    return pid


def _config(context: Context) -> Config:
    """Run config plus what this SuperNode knows better (deploy/supernode.sh --device/--data-path)."""
    run_config = dict(context.run_config)
    for key in ("data-path", "device"):
        value = context.node_config.get(key)
        if isinstance(value, str) and value:
            run_config[key] = value
    return _load(tuple(sorted(run_config.items())))


@lru_cache(maxsize=4)
def _load(items: tuple[tuple[str, Scalar], ...]) -> Config:
    """Parse, import the plug-ins and validate once per process and config."""
    return parts.load_config(dict(items), app_dir=APP_DIR)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _config(context)
    global_state, config = downlink.receive(msg, context, cfg)  # dense, or rebuilt from payloads
    faults.inject(cfg, _partition_id(context), config_int(config, "server-round"))
    ef = None
    if cfg.error_feedback:  # the residual lives in the node's Context.state across rounds
        ef = codecs.ErrorFeedback()
        if "error-feedback" in context.state.array_records:
            ef.load_state_dict(record_to_state(context.state.array_records["error-feedback"]))
    payload, metrics = pipeline.client_round(
        cfg,
        _partition_id(context),
        global_state,
        key=key_from_config(config),
        server_round=config_int(config, "server-round"),
        slot=config_int(config, "slot"),
        error_feedback=ef,
        residual=train_residual(msg),  # factor-mode='exact': FedEx-LoRA base residual
    )
    if ef is not None:
        context.state["error-feedback"] = state_to_record(ef.state_dict())
    dp = _client_dp(config)  # distributed DP / SecAgg: clip (and noise) before anything leaves
    key, t, slot = key_from_config(config), config_int(config, "server-round"), config_int(config, "slot")
    if is_secure(msg):
        from fedtune.privacy.client import secure_vector

        c = float(config["secagg-clip-range"])  # type: ignore[arg-type]
        vec = secure_vector(pipeline.codec(cfg), payload, global_state, dp, key=key, clip_range=c)
        weight = 1.0 if cfg.dp != "none" else metrics["num-examples"]
        return Message(content=secure_reply(vec, weight, metrics), reply_to=msg)
    if dp is not None:
        from fedtune.privacy.client import privatize_payload

        payload, extra = privatize_payload(
            pipeline.codec(cfg), payload, global_state, dp, key=key, server_round=t, slot=slot
        )
        metrics = {**metrics, **extra}
    content = RecordDict({"arrays": payload_to_record(payload), "metrics": metrics_record(metrics)})
    return Message(content=content, reply_to=msg)


def _client_dp(config: Any) -> Any:
    """The round's :class:`fedtune.privacy.ClientDP` from the train config (None: nothing
    to do here, the server clips and adds the noise)."""
    if "dp-clip" not in config:
        return None
    from fedtune.privacy import ClientDP

    return ClientDP(
        clip=float(config["dp-clip"]),
        noise_std=float(config.get("dp-noise-std", 0.0)),
        bit_std=float(config.get("dp-bit-std", 0.0)),
        seeded=bool(config.get("dp-seeded", False)),
    )


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds: its keys are issued per partition."""
    return Message(
        content=RecordDict({"identity": metrics_record({"partition-id": _partition_id(context)})}),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this client's own data."""
    cfg = _config(context)
    state, _ = train_inputs(msg)
    res = pipeline.evaluate_state(
        cfg,
        state,
        on="client",
        partition_id=_partition_id(context),
        residual=train_residual(msg),
    )
    return Message(content=RecordDict({"metrics": metrics_record(res)}), reply_to=msg)
