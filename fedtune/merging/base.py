"""The merger protocol, the registry, and the flat-vector plumbing every method shares.

Protocol
--------
A merger combines client deltas ``τ_i = θ_i − θ_t`` (``dict[str, Tensor]``, same names,
shapes, fp32) with non-negative weights ``w_i`` (e.g. number of examples) into one merged
delta (the server's pseudo-gradient with the sign flipped; see :mod:`.server_opt`).

* Every merger has ``streaming: bool`` and ``merge(deltas, weights, *, key=None)``.
* A **streaming** merger (O(d) state, one pass) also has ``add(delta, weight, *, key=None)``,
  ``finish() -> dict`` and ``reset()``. ``finish()`` returns the result and resets, so one
  object serves every round. ``merge`` is ``reset(); add(...) for each; finish()``.
* A **batch** merger needs all deltas at once (median, Krum, two-pass methods). Coordinate-
  wise ones flatten each client to one vector view and work on coordinate chunks, so the
  extra memory is O(n · chunk), not O(n · d).

Randomness (DARE): ``add(..., key=k)`` takes the client's own 64-bit key -- the strategy
should pass ``rng.derive_key(run_seed, round, slot)`` so the result does not depend on
arrival order. ``merge(..., key=k)`` takes a round key and gives client ``i`` (its index in
the list) ``rng.derive_key(k, i)``. Deterministic methods ignore keys. A randomized method
called without a key raises.

Weights: finite, ``>= 0``, positive sum. Methods that cannot use weights (median,
trimmed mean, Krum's selection, MagMax) say so in their docstring.

Declarations (read by :mod:`fedtune.parts` with ``getattr(m, name, False)``, so a merger that
does not derive from the bases here counts as neither):

* ``linear`` (class attribute): the merge is a fixed linear combination of the deltas (with
  coefficients from the weights only), so clients can replay the server's global state from
  the payloads (compact downlink). Today: fedavg and task-arithmetic.
* ``weighted_mean`` (class or instance attribute, may depend on the options): the merge IS
  the weighted mean ``Σ w_i Δ_i / Σ w_i``, as FedEx-LoRA's exact mode needs. Today: fedavg,
  and task-arithmetic with ``scale == 1`` and ``normalize=True``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from fedtune.registry import Registry

Delta = Mapping[str, Tensor]

#: Coordinates × clients held at once by chunked batch methods (64 MiB of fp32).
BATCH_BUDGET = 1 << 24


@runtime_checkable
class Merger(Protocol):
    """What :func:`fedtune.merging.get` returns."""

    @property
    def streaming(self) -> bool:
        """Whether ``add``/``finish``/``reset`` are available (O(d) one-pass state)."""
        ...

    def merge(
        self, deltas: Sequence[Delta], weights: Sequence[float], *, key: int | None = None
    ) -> dict[str, Tensor]: ...


MERGERS: Registry[Merger] = Registry("merger")


_F = TypeVar("_F", bound=Callable[..., Merger])


def register(name: str) -> Callable[[_F], _F]:
    """Decorator that registers a merger class under ``name`` (see docs/extending.md)."""
    deco = MERGERS.register(name)

    def wrap(factory: _F) -> _F:
        deco(factory)
        return factory

    return wrap


def get(name: str, **options: Any) -> Merger:
    """Build merger ``name``; unknown names or options raise ``RegistryError`` listing the allowed."""
    return MERGERS.get(name, **options)


def names() -> list[str]:
    """Registered merger names."""
    return MERGERS.names()


def client_key(key: int | None, index: int) -> int | None:
    """Per-client key derived from a round key (``None`` stays ``None``)."""
    if key is None:
        return None
    from fedtune import rng

    return rng.derive_key(key, index)


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class FlatLayout:
    """Names, shapes and offsets of a delta seen as one flat vector of ``total`` coordinates."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    total: int
    device: torch.device

    @classmethod
    def of(cls, delta: Delta) -> FlatLayout:
        if not delta:
            raise ValueError("a delta must contain at least one tensor")
        names, shapes, offsets, off = [], [], [], 0
        device = None
        for name, t in delta.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"delta[{name!r}] is {type(t).__name__}, expected a Tensor")
            if t.dtype != torch.float32:
                raise ValueError(f"delta[{name!r}] has dtype {t.dtype}; mergers expect float32")
            device = device or t.device
            names.append(name)
            shapes.append(t.shape)
            offsets.append(off)
            off += t.numel()
        assert device is not None
        return cls(tuple(names), tuple(shapes), tuple(offsets), off, device)

    def check(self, delta: Delta, what: str = "delta") -> None:
        """Raise if ``delta`` does not have exactly this layout or holds non-finite values."""
        if tuple(delta.keys()) != self.names:
            missing = sorted(set(self.names) - set(delta))
            extra = sorted(set(delta) - set(self.names))
            raise ValueError(
                f"{what} has other tensor names than the first delta"
                f" (missing {missing}, unexpected {extra}, or a different order)"
            )
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = delta[name]
            if t.dtype != torch.float32:
                raise ValueError(f"{what}[{name!r}] has dtype {t.dtype}; mergers expect float32")
            if t.shape != shape:
                raise ValueError(
                    f"{what}[{name!r}] has shape {tuple(t.shape)}, expected {tuple(shape)}"
                )
            if t.device != self.device:
                raise ValueError(f"{what}[{name!r}] is on {t.device}, expected {self.device}")
            # One float64 reduction (no temporary): NaN/Inf propagate, finite fp32 cannot overflow.
            if not math.isfinite(float(t.sum(dtype=torch.float64))):
                raise ValueError(f"{what}[{name!r}] contains NaN or Inf")

    def flat(self, delta: Delta) -> list[Tensor]:
        """One flat (view where possible) tensor per entry, in layout order."""
        return [delta[n].reshape(-1) for n in self.names]

    def pieces(self, delta: Delta, chunk: int) -> Iterator[tuple[int, Tensor]]:
        """``(flat_offset, flat_chunk)`` over the whole delta, at most ``chunk`` at a time."""
        for off, f in zip(self.offsets, self.flat(delta), strict=True):
            for s in range(0, f.numel(), chunk):
                yield off + s, f[s : s + chunk]

    def spans(self, chunk: int) -> Iterator[tuple[int, int, int, int]]:
        """``(tensor_index, start, stop, flat_offset)`` chunks that never cross tensors."""
        for i, (off, shape) in enumerate(zip(self.offsets, self.shapes, strict=True)):
            n = math.prod(shape)
            for s in range(0, n, chunk):
                yield i, s, min(n, s + chunk), off + s

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat vector of ``total`` coordinates into named views with the right shapes."""
        if vec.numel() != self.total:
            raise ValueError(f"flat vector has {vec.numel()} entries, layout has {self.total}")
        out: dict[str, Tensor] = {}
        for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True):
            out[name] = vec[off : off + math.prod(shape)].view(shape)
        return out

    def zeros(self) -> Tensor:
        return torch.zeros(self.total, dtype=torch.float32, device=self.device)


def check_weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"client weight must be finite and >= 0, got {weight!r}")
    return w


def check_inputs(
    deltas: Sequence[Delta], weights: Sequence[float]
) -> tuple[FlatLayout, list[float]]:
    """Validate a batch of deltas and weights; return their common layout and float weights."""
    if len(deltas) == 0:
        raise ValueError("merge needs at least one delta")
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(deltas)} deltas but {len(weights)} weights")
    ws = [check_weight(w) for w in weights]
    if sum(ws) <= 0:
        raise ValueError("client weights sum to 0")
    layout = FlatLayout.of(deltas[0])
    for i, d in enumerate(deltas):
        layout.check(d, f"deltas[{i}]")
    return layout, ws


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_range(
    name: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> float:
    v = float(value)
    ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok or math.isnan(v):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v


# ----------------------------------------------------------------------------- bases


class StreamingMerger(abc.ABC):
    """Base of one-pass mergers with O(d) state. Subclasses implement ``_begin``/``_add``/``_finish``."""

    streaming: ClassVar[bool] = True
    #: Whether ``add`` needs a key (randomized methods).
    needs_key: ClassVar[bool] = False
    #: A fixed linear combination of the deltas (see the module docstring).
    linear: ClassVar[bool] = False
    #: Exactly the weighted mean ``Σ w_i Δ_i / Σ w_i`` (see the module docstring).
    weighted_mean: bool = False

    def __init__(self) -> None:
        self._layout: FlatLayout | None = None
        self._count = 0
        self._weight_sum = 0.0

    def reset(self) -> None:
        """Drop any partial state (start a fresh round)."""
        self._layout = None
        self._count = 0
        self._weight_sum = 0.0
        self._reset_state()

    def add(self, delta: Delta, weight: float, *, key: int | None = None) -> None:
        """Fold one client's delta into the running state."""
        w = check_weight(weight)
        if self.needs_key and key is None:
            raise ValueError(f"{type(self).__name__} is randomized and needs a key")
        if self._layout is None:
            layout = FlatLayout.of(delta)
            layout.check(delta, "delta")
            self._layout = layout
            self._begin(layout)
        else:
            self._layout.check(delta, f"delta #{self._count}")
        self._add(self._layout, delta, w, key)
        self._count += 1
        self._weight_sum += w

    def finish(self) -> dict[str, Tensor]:
        """The merged delta of everything added since the last reset; then reset."""
        if self._layout is None or self._count == 0:
            raise ValueError("finish() called before any add()")
        if self._weight_sum <= 0:
            self.reset()
            raise ValueError("client weights sum to 0")
        layout = self._layout
        try:
            vec = self._finish(layout)
        finally:
            self.reset()
        return layout.unflatten(vec)

    def merge(
        self, deltas: Sequence[Delta], weights: Sequence[float], *, key: int | None = None
    ) -> dict[str, Tensor]:
        if len(deltas) == 0:
            raise ValueError("merge needs at least one delta")
        if len(weights) != len(deltas):
            raise ValueError(f"got {len(deltas)} deltas but {len(weights)} weights")
        if self.needs_key and key is None:
            raise ValueError(f"{type(self).__name__} is randomized and needs a key")
        self.reset()
        try:
            for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
                self.add(d, w, key=client_key(key, i))
        except BaseException:
            self.reset()  # a failed merge leaves no partial round behind
            raise
        return self.finish()

    @abc.abstractmethod
    def _reset_state(self) -> None: ...

    @abc.abstractmethod
    def _begin(self, layout: FlatLayout) -> None: ...

    @abc.abstractmethod
    def _add(self, layout: FlatLayout, delta: Delta, weight: float, key: int | None) -> None: ...

    @abc.abstractmethod
    def _finish(self, layout: FlatLayout) -> Tensor: ...


class BatchMerger(abc.ABC):
    """Base of mergers that need every delta at once."""

    streaming: ClassVar[bool] = False
    needs_key: ClassVar[bool] = False
    #: A fixed linear combination of the deltas (see the module docstring).
    linear: ClassVar[bool] = False
    #: Exactly the weighted mean ``Σ w_i Δ_i / Σ w_i`` (see the module docstring).
    weighted_mean: bool = False

    def merge(
        self, deltas: Sequence[Delta], weights: Sequence[float], *, key: int | None = None
    ) -> dict[str, Tensor]:
        layout, ws = check_inputs(deltas, weights)
        if self.needs_key and key is None:
            raise ValueError(f"{type(self).__name__} is randomized and needs a key")
        return layout.unflatten(self._merge(layout, deltas, ws, key))

    @abc.abstractmethod
    def _merge(
        self, layout: FlatLayout, deltas: Sequence[Delta], weights: list[float], key: int | None
    ) -> Tensor: ...


class CoordinatewiseMerger(BatchMerger):
    """A batch merger whose output at a coordinate depends only on the n values there.

    ``_combine(x, w)`` gets ``x`` of shape ``(n, c)`` (one coordinate chunk of every client)
    and weights ``w`` of shape ``(n,)``; it returns ``(c,)``. Chunks are sized so that
    ``n · c <= BATCH_BUDGET``.
    """

    def _merge(
        self, layout: FlatLayout, deltas: Sequence[Delta], weights: list[float], key: int | None
    ) -> Tensor:
        n = len(deltas)
        self._check_n(n)
        chunk = max(1024, BATCH_BUDGET // n)
        flats = [layout.flat(d) for d in deltas]
        w = torch.tensor(weights, dtype=torch.float32, device=layout.device)
        out = layout.zeros()
        for ti, s, e, off in layout.spans(chunk):
            x = torch.stack([f[ti][s:e] for f in flats])
            out[off : off + (e - s)] = self._combine(x, w)
        return out

    def _check_n(self, n: int) -> None:
        """Raise if the method cannot work with ``n`` clients."""

    @abc.abstractmethod
    def _combine(self, x: Tensor, w: Tensor) -> Tensor: ...
