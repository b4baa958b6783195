"""Conversions between fedtune's tensors / payloads and Flower records (the only Flower glue
besides :mod:`fedtune.fl.strategy`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

PAYLOAD = "payload"


class RecordError(ValueError):
    """A reply's records are missing or malformed."""


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """fp32 CPU tensors -> ArrayRecord keyed by tensor name (bf16 cannot pass numpy)."""
    return ArrayRecord(
        {
            k: Array(v.detach().to("cpu", torch.float32).contiguous().numpy())
            for k, v in state.items()
        }
    )


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> fp32 CPU tensors in the record's order."""
    out: dict[str, torch.Tensor] = {}
    for k, arr in record.items():
        a = arr.numpy()
        if a.dtype.kind != "f":
            raise RecordError(f"array {k!r} has dtype {a.dtype}, expected floating point")
        out[k] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return out


def payload_to_record(payload: bytes) -> ArrayRecord:
    """An encoded update travels as ONE uint8 array named 'payload'."""
    return ArrayRecord({PAYLOAD: Array(np.frombuffer(payload, dtype=np.uint8).copy())})


def record_to_payload(record: ArrayRecord) -> bytes:
    """The bytes of a reply's 'payload' array, or a RecordError saying what is wrong."""
    if PAYLOAD not in record:
        raise RecordError(f"reply has no '{PAYLOAD}' array (found {sorted(record.keys())[:5]})")
    if len(record) != 1:
        raise RecordError(f"reply carries {len(record)} arrays; expected only '{PAYLOAD}'")
    a = record[PAYLOAD].numpy()
    if a.dtype != np.uint8 or a.ndim != 1:
        raise RecordError(
            f"'{PAYLOAD}' must be a 1-D uint8 array, got {a.dtype} with shape {a.shape}"
        )
    return a.tobytes()


def key_to_config(key: int) -> bytes:
    """64-bit keys exceed ConfigRecord's signed int64: send them as 8 little-endian bytes."""
    return int(key).to_bytes(8, "little")


def key_from_config(config: ConfigRecord, name: str = "key") -> int:
    raw = config.get(name)
    if not isinstance(raw, bytes) or len(raw) != 8:
        raise RecordError(f"train config has no valid '{name}' (8 bytes), got {raw!r}")
    return int.from_bytes(raw, "little")


def metrics_record(values: Mapping[str, int | float]) -> MetricRecord:
    """A MetricRecord from plain numbers (bools are not numbers here: Flower rejects them)."""
    clean: dict[str, int | float | list[int] | list[float]] = {}
    for k, v in values.items():
        clean[k] = float(v) if isinstance(v, bool) else v
    return MetricRecord(clean)


def train_inputs(msg: Message) -> tuple[dict[str, torch.Tensor], ConfigRecord]:
    """The global adapter and the config of a train message, or a RecordError."""
    content = msg.content
    if "arrays" not in content.array_records or "config" not in content.config_records:
        raise RecordError("train message lacks the 'arrays' or 'config' record")
    return record_to_state(content.array_records["arrays"]), content.config_records["config"]


def config_int(config: ConfigRecord, name: str) -> int:
    v = config.get(name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise RecordError(f"train config has no integer '{name}', got {v!r}")
    return v


RESIDUAL = "residual"
"""Train-message ArrayRecord with the FedEx-LoRA base-weight residual (factor-mode='exact')."""


def train_residual(msg: Message) -> dict[str, torch.Tensor] | None:
    """The residual a train / evaluate message carries (exact mode), or None (= zero)."""
    if RESIDUAL not in msg.content.array_records:
        return None
    return record_to_state(msg.content.array_records[RESIDUAL])


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """What ``state`` costs on the wire as an ArrayRecord (the simulator's accounting uses
    this, so its byte counts equal a Flower run's)."""
    return state_to_record(state).count_bytes()


def payload_bytes(payload: bytes) -> int:
    """What one encoded update costs on the wire as a reply's ArrayRecord."""
    return payload_to_record(payload).count_bytes()

def one_line(reason: str | None) -> str:
    """A client error's reason in one line: Flower passes a Ray traceback, whose informative
    part is the last line naming fedtune (an injected fault, a config error) or else its last
    line; the whole traceback stays in the run's log.txt."""
    lines = [x.strip() for x in (reason or "").splitlines() if x.strip()]
    if not lines:
        return "(no reason given)"
    ours = [x for x in lines if "fedtune:" in x]
    return (ours or lines)[-1]
