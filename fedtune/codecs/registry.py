"""The codec registry: ``register(name)`` decorator, ``get(name, **options)``, ``names()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedtune.codecs.base import Codec
from fedtune.registry import Registry

REGISTRY: Registry[Codec] = Registry("codec")


def register(name: str) -> Callable[[Callable[..., Codec]], Callable[..., Codec]]:
    """Class decorator adding a codec under ``name`` (lower-case)."""
    return REGISTRY.register(name)


def get(name: str, **options: Any) -> Codec:
    """Build codec ``name``; unknown names or options raise an error listing the allowed ones."""
    return REGISTRY.get(name, **options)


def names() -> list[str]:
    """Registered codec names, sorted."""
    return REGISTRY.names()
