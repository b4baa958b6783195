"""fedtune ClientApp: read the message -> train / evaluate with fedtune -> reply."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import codecs, pipeline
from fedtune.config import parse
from fedtune.fl.records import key_from_config, payload_to_record, record_to_state, state_to_record

app = ClientApp()


def _partition_id(context: Context) -> int:
    """Simulation sets partition-id; a deployed SuperNode gets it from --node-config."""
    pid = context.node_config.get("partition-id")
    if not isinstance(pid, int):
        raise ValueError("node config lacks an integer 'partition-id' (--node-config \"partition-id=0\")")
    return pid


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = parse(context.run_config, validate_methods=False)
    config = msg.content["config"]
    ef = None
    if cfg.error_feedback:  # the residual lives in the node's Context.state across rounds
        ef = codecs.ErrorFeedback()
        if "error-feedback" in context.state.array_records:
            ef.load_state_dict(record_to_state(context.state.array_records["error-feedback"]))
    payload, metrics = pipeline.client_round(
        cfg,
        _partition_id(context),
        record_to_state(msg.content["arrays"]),
        key=key_from_config(config),
        server_round=int(config["server-round"]),
        slot=int(config["slot"]),
        error_feedback=ef,
    )
    if ef is not None:
        context.state["error-feedback"] = state_to_record(ef.state_dict())
    content = RecordDict({"arrays": payload_to_record(payload), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds: its keys are issued per partition."""
    return Message(
        content=RecordDict({"identity": MetricRecord({"partition-id": _partition_id(context)})}),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this client's own data."""
    cfg = parse(context.run_config, validate_methods=False)
    res = pipeline.evaluate_state(
        cfg, record_to_state(msg.content["arrays"]), on="client", partition_id=_partition_id(context)
    )
    return Message(content=RecordDict({"metrics": MetricRecord(res)}), reply_to=msg)
