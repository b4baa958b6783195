"""A tiny name -> factory registry shared by adapters, codecs and mergers.

Follows mergekit's ``merge_methods/registry.py`` and PEFT's ``register_peft_method``:
a method lives in one file and registers itself with a decorator; the package
``__init__`` imports every method file so the registry is complete on import.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name or a bad option for a registered method."""


class Registry(Generic[T]):
    """Maps lower-case names to factories (usually classes) of one kind of method."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@registry.register("ties")`` on a class or factory function."""
        if not name or name != name.lower() or name.strip() != name:
            raise RegistryError(f"{self.kind} name {name!r} must be non-empty lower-case")

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items and self._items[name] is not factory:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._items[name] = factory
            return factory

        return deco

    def names(self) -> list[str]:
        """Registered names, sorted (for error messages and docs)."""
        return sorted(self._items)

    def factory(self, name: str) -> Callable[..., T]:
        """The registered factory, or an error that lists what is allowed."""
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            ) from None

    def get(self, name: str, **cfg: Any) -> T:
        """Build the method ``name`` with keyword options; unknown options fail fast."""
        factory = self.factory(name)
        allowed = _option_names(factory)
        unknown = sorted(set(cfg) - allowed) if allowed is not None else []
        if unknown:
            raise RegistryError(
                f"{self.kind} {name!r} has no option(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(allowed or ())) or '(none)'}"
            )
        try:
            return factory(**cfg)
        except (TypeError, ValueError) as e:
            raise RegistryError(f"{self.kind} {name!r}: {e}") from e

    def __contains__(self, name: object) -> bool:
        return name in self._items


def _option_names(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword options a factory accepts; None when it takes **kwargs (cannot check)."""
    if dataclasses.is_dataclass(factory):
        return {f.name for f in dataclasses.fields(factory) if f.init}
    sig = inspect.signature(factory)
    names: set[str] = set()
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
            names.add(p.name)
    return names
