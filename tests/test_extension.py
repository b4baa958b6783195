"""Extension is one file: a new merger, codec and adapter, each written as ONE file outside
fedtune, named in the run config with ``plugins=``, run a 2-round in-process simulation."""

from __future__ import annotations

import json
import textwrap

import pytest

from fedtune.simulate import Simulation, build_config

pytestmark = pytest.mark.usefixtures("isolated_registries")

MERGER = '''
from fedtune import merging
from fedtune.merging import CoordinatewiseMerger


@merging.register("ext-trimmed-max")
class TrimmedMax(CoordinatewiseMerger):
    """Per coordinate: the value of largest magnitude, halved."""

    def _combine(self, x, w):
        idx = x.abs().argmax(dim=0, keepdim=True)
        return x.gather(0, idx)[0] * 0.5
'''

CODEC = '''
import numpy as np
import torch

from fedtune import codecs
from fedtune.codecs.base import Codec, PayloadError


@codecs.register("ext-fp16")
class Fp16(Codec):
    """Every tensor as raw little-endian fp16, in the order of ``like``."""

    name = "ext-fp16"

    def encode(self, delta, key, *, round=0, slot=0):
        return b"".join(v.to(torch.float16).numpy().astype("<f2").tobytes() for v in delta.values())

    def decode(self, payload, like, *, key=None, round=None, slot=None):
        if len(payload) != self.max_payload_bytes(like):
            raise PayloadError(f"ext-fp16 payload has {len(payload)} bytes")
        out, off = {}, 0
        for k, v in like.items():
            n = v.numel() * 2
            a = np.frombuffer(payload[off : off + n], dtype="<f2").astype(np.float32)
            out[k] = torch.from_numpy(a.copy()).view_as(v)
            off += n
        return out

    def max_payload_bytes(self, like):
        return sum(v.numel() for v in like.values()) * 2
'''

ADAPTER = '''
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file

from fedtune import adapters


@adapters.register("ext-head-only")
@dataclass
class HeadOnly:
    """Train only the classification head (and the base biases with ``biases=True``)."""

    biases: bool = False
    name: str = field(default="ext-head-only", init=False)

    def attach(self, model, key):
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith("classifier") or (self.biases and n.endswith(".bias"))
        return model

    def export_peft(self, model, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(out / "head.safetensors"))
'''


@pytest.mark.parametrize(
    ("source", "overrides"),
    [
        (MERGER, "merger='ext-trimmed-max'"),
        (CODEC, "codec='ext-fp16'"),
        (ADAPTER, "adapter='ext-head-only' adapter-biases=true"),
    ],
    ids=["merger", "codec", "adapter"],
)
def test_a_method_in_one_file_runs_a_two_round_simulation(
    source, overrides, tiny_run_config, tmp_path
):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(textwrap.dedent(source))
    kv = " ".join(f"{k}={json.dumps(v)}" for k, v in tiny_run_config.items())
    cfg = build_config([kv, f"plugins='{plugin}' {overrides}"])
    sim = Simulation(cfg, echo=lambda line: None)
    final = sim.run()
    rows = [json.loads(x) for x in (sim.folder.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["valid-replies"] == 3 for r in rows[1:])
    # the method was really used: the global adapter moved, and with the fp16 codec the
    # uplink is half of fp32's; the adapter trains exactly the tensors the plug-in chose
    initial = sim.wb.initial
    assert any(not (final[k] == initial[k]).all() for k in final)
    if "ext-fp16" in overrides:
        n = sum(v.numel() for v in initial.values())
        assert all(len(r.applied[0].payload) == 2 * n for r in sim.history)
    if "ext-head-only" in overrides:
        assert all(k.startswith("classifier") or k.endswith(".bias") for k in final)
        assert (sim.folder.path / "adapter" / "head.safetensors").exists()
