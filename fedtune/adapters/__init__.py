"""Adapter methods, registered by name: ``adapters.get("lora", r=8)``.

Adding one: a file in this package with ``@REGISTRY.register("name")`` and one import line
below (see docs/extending.md).
"""

from fedtune.adapters import lora, mos  # noqa: F401  (register "lora", "mos")
from fedtune.adapters.base import (
    REGISTRY,
    Adapter,
    layout_hash,
    load_trainable_state,
    trainable_state,
)

get = REGISTRY.get
names = REGISTRY.names
register = REGISTRY.register

__all__ = [
    "REGISTRY",
    "Adapter",
    "get",
    "layout_hash",
    "load_trainable_state",
    "names",
    "register",
    "trainable_state",
]
