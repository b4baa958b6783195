"""fedtune: federated fine-tuning of transformer adapters on Flower.

The math (adapters, codecs, merging, training) never imports Flower; only
:mod:`fedtune.fl` converts to and from Flower records.
"""

import os

# Offline first: no hub downloads at run time unless the user asks for them explicitly
# (HF_HUB_OFFLINE=0). Set before transformers / huggingface_hub read their constants.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"
