"""fedtune: federated fine-tuning of transformer adapters on Flower.

The math (adapters, codecs, merging, training) never imports Flower; only
:mod:`fedtune.fl` converts to and from Flower records.
"""

__version__ = "0.1.0"
