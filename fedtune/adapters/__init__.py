"""Adapter methods, registered by name: ``adapters.get("lora", r=8)``.

Adding one: a file in this package with ``@REGISTRY.register("name")`` and one import line
below (see docs/extending.md).
"""

from fedtune.adapters import lora  # noqa: F401  (registers "lora")
from fedtune.adapters.base import (
    REGISTRY,
    Adapter,
    layout_hash,
    load_trainable_state,
    trainable_state,
)

try:  # MoS lands in its own change; keep the package importable without it
    from fedtune.adapters import mos  # noqa: F401  (registers "mos")
except ImportError:  # pragma: no cover
    pass

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
