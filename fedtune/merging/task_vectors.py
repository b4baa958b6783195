"""The task-arithmetic family as one pipeline: sparsify -> elect -> merge -> scale.

mergekit's ``generalized_task_arithmetic.py`` declares each of its methods by a sparsification
method, whether it does sign consensus and whether it normalises. This module is the same
idea for fedtune's streaming mergers: a method is a :class:`Steps` value, and one merger class
(:class:`TaskVectorMerger`) runs it.

1. **Sparsify** each client's delta on its own, through the stages of ``Steps.sparsify`` in
   order: :class:`Magnitude` (TIES trim, global or per tensor), :class:`RandomDrop` (DARE),
   :class:`RowOutliers` (Breadcrumbs). A stage yields *pieces* ``(flat_offset, values,
   threshold)``: the kept entries are ``magnitude_mask(values, threshold)`` (``threshold``
   ``None`` keeps every non-zero), so a magnitude trim never writes a masked copy. Stages that
   keep everything (``trivial()``, e.g. density 1) are skipped; a stage after another one gets
   the earlier output materialized (d floats), since a trim needs the whole delta.
2. **Elect** (``elect=True``): TIES sign election ``γ = sign(Σ_i w_i τ̂_i)`` and the disjoint
   mean over the clients that agree with it (:class:`.sparsify.SignedAccumulator`, 4·d state).
3. **Merge** otherwise: ``"sum"`` = ``Σ_i w_i τ̂_i`` (one d-vector), ``"max-magnitude"`` = per
   coordinate the value with the largest ``|·|`` (later clients win ties; zero weights skip).
4. **Normalise and scale**: a sum is multiplied by ``scale / Σ w`` (``normalize=True``) or by
   ``scale / mean(w)`` (``normalize=False``); an elected or max merge by ``scale``.

Every step is chunked and elementwise, so all methods here stream with O(d) state. The float
operations are exactly those of the per-method code this replaced (bit-identical results,
checked by ``tests/test_task_vectors.py``). Methods whose sparsification depends on *all*
clients (consensus's TALL masks, PCB's inter-balancing) cannot stream; they are batch mergers
that reuse :func:`chunks`, :class:`WeightedSum` and :func:`scaled`.

Each method file declares a frozen options dataclass (its registered options and defaults,
checked in ``__post_init__``) with a ``steps()`` method, and a merger class that names it as
``Options`` (:class:`WithOptions` gives the class the dataclass's signature, for the registry).
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from .base import Delta, FlatLayout, StreamingMerger, check_choice, check_range
from .sparsify import (
    SignedAccumulator,
    bernoulli_keep,
    chunk_size,
    magnitude_mask,
    magnitude_threshold,
)

#: Where a magnitude trim ranks entries: the whole delta (the TIES paper) or each tensor.
SCOPES = ("global", "tensor")
MERGES = ("sum", "max-magnitude")
RESCALES = ("none", "mean-norm")

#: ``(flat_offset, values, threshold)``; the kept entries are ``magnitude_mask(values, threshold)``.
Piece = tuple[int, Tensor, float | None]


def check_scale(scale: float) -> float:
    """λ, the factor applied to the merged delta."""
    return check_range("scale", scale, -1e6, 1e6)


def chunks(layout: FlatLayout, flats: Sequence[Tensor]) -> Iterator[tuple[int, Tensor]]:
    """``(flat_offset, chunk)`` over one client's flat tensors, as ``layout.pieces`` cuts them."""
    step = chunk_size(layout.total, layout.device)
    for off, f in zip(layout.offsets, flats, strict=True):
        for s in range(0, f.numel(), step):
            yield off + s, f[s : s + step]


def kept(x: Tensor, threshold: float | None) -> Tensor:
    """The piece's values with the entries its threshold drops set to 0."""
    return x if threshold is None else torch.where(magnitude_mask(x, threshold), x, 0.0)


def scaled(out: Tensor, scale: float) -> Tensor:
    """``out * scale`` in place (``* 1.0`` is exact, so it is skipped)."""
    return out.mul_(scale) if scale != 1.0 else out


# ----------------------------------------------------------------------------- 1. sparsify


class Sparsifier(abc.ABC):
    """One stage of step 1: one client's flat tensors -> pieces (see the module docstring)."""

    #: Draws random numbers from the client key.
    needs_key: ClassVar[bool] = False

    def trivial(self) -> bool:
        """Whether the stage keeps every entry unchanged (then the pipeline skips it)."""
        return False

    @abc.abstractmethod
    def pieces(
        self, layout: FlatLayout, flats: Sequence[Tensor], key: int | None
    ) -> Iterator[Piece]: ...


@dataclass(frozen=True)
class Magnitude(Sparsifier):
    """TIES trim: keep the top ``density`` fraction by ``|·|`` (:func:`.sparsify.magnitude_threshold`:
    exact k-th largest, ties at the threshold all kept, zeros never), over the whole delta or
    per tensor. Yields the untouched values with the threshold."""

    density: float
    scope: str = "global"

    def trivial(self) -> bool:
        return self.density >= 1.0

    def pieces(
        self, layout: FlatLayout, flats: Sequence[Tensor], key: int | None
    ) -> Iterator[Piece]:
        if self.scope == "global":
            thresholds = [magnitude_threshold(flats, self.density)] * len(flats)
        else:
            thresholds = [magnitude_threshold([f], self.density) for f in flats]
        step = chunk_size(layout.total, layout.device)
        for off, f, t in zip(layout.offsets, flats, thresholds, strict=True):
            for s in range(0, f.numel(), step):
                yield off + s, f[s : s + step], t


@dataclass(frozen=True)
class RandomDrop(Sparsifier):
    """DARE: drop each entry with probability ``drop_rate`` and divide survivors by ``1 − p``;
    entry ``i`` is kept iff ``rng.uniform(key, 0, .)[i] < 1 − p`` (:func:`.sparsify.bernoulli_keep`),
    so the mask depends only on the client key and the flat index, not on chunking or device."""

    drop_rate: float
    needs_key: ClassVar[bool] = True

    def pieces(
        self, layout: FlatLayout, flats: Sequence[Tensor], key: int | None
    ) -> Iterator[Piece]:
        if key is None:
            raise ValueError("the DARE random drop needs a client key")
        keep = 1.0 - self.drop_rate
        for off, x in chunks(layout, flats):
            m = bernoulli_keep(key, x.numel(), keep, offset=off, device=x.device)
            yield off, torch.where(m, x / keep, 0.0), None


def breadcrumbs_rows(x: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs mask on every row of ``x`` (``(rows, c)``): drop the ``floor(gamma·c)``
    largest ``|·|`` (fewer if they and the kept ones exceed ``c``), keep the next
    ``floor(density·c)``, zero the rest."""
    c = x.shape[-1]
    k = math.floor(density * c * (1 + 1e-12))
    n_top = min(math.floor(gamma * c * (1 + 1e-12)), c - k)
    if k == 0:
        return torch.zeros_like(x)
    idx = torch.topk(x.abs(), n_top + k, dim=-1, sorted=True).indices[:, n_top:]
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
    return torch.where(mask, x, 0.0)


@dataclass(frozen=True)
class RowOutliers(Sparsifier):
    """Breadcrumbs, per row (last dimension) of every tensor (:func:`breadcrumbs_rows`); 0-d
    tensors are kept, 1-d tensors are one row. Pieces are whole rows."""

    density: float
    gamma: float

    def pieces(
        self, layout: FlatLayout, flats: Sequence[Tensor], key: int | None
    ) -> Iterator[Piece]:
        for f, shape, off in zip(flats, layout.shapes, layout.offsets, strict=True):
            if len(shape) == 0:
                yield off, f, None
                continue
            rows = f.reshape(-1, shape[-1])
            c = rows.shape[1]
            step = max(1, chunk_size(layout.total, layout.device) // max(c, 1))
            for r in range(0, rows.shape[0], step):
                block = breadcrumbs_rows(rows[r : r + step], self.density, self.gamma)
                yield off + r * c, block.reshape(-1), None


def _materialize(layout: FlatLayout, pieces: Iterator[Piece]) -> list[Tensor]:
    """A stage's output as one flat tensor per entry (views of one d-vector)."""
    full = layout.zeros()
    for off, x, t in pieces:
        full[off : off + x.numel()] = kept(x, t)
    return [full[o : o + math.prod(s)] for o, s in zip(layout.offsets, layout.shapes, strict=True)]


# ----------------------------------------------------------------------------- 2-4. merge


class Accumulator(Protocol):
    """The O(d) streaming state of steps 2-4."""

    def add(self, offset: int, x: Tensor, threshold: float | None, weight: float) -> None: ...

    def finish(self, steps: Steps, weight_sum: float, count: int) -> Tensor: ...


class WeightedSum:
    """``Σ_i w_i τ̂_i`` (d floats); ``finish`` normalises and scales (step 4)."""

    def __init__(self, layout: FlatLayout) -> None:
        self.sum = layout.zeros()

    def add(self, offset: int, x: Tensor, threshold: float | None, weight: float) -> None:
        self.sum[offset : offset + x.numel()].add_(kept(x, threshold), alpha=weight)

    def finish(self, steps: Steps, weight_sum: float, count: int) -> Tensor:
        denom = weight_sum if steps.normalize else weight_sum / count
        return self.sum.mul_(steps.scale / denom)


class DisjointMean:
    """Sign election + disjoint weighted mean (:class:`.sparsify.SignedAccumulator`, 4·d)."""

    def __init__(self, layout: FlatLayout) -> None:
        self.acc = SignedAccumulator(layout.total, layout.device)

    def add(self, offset: int, x: Tensor, threshold: float | None, weight: float) -> None:
        self.acc.add(offset, x, weight, threshold)

    def finish(self, steps: Steps, weight_sum: float, count: int) -> Tensor:
        return scaled(self.acc.finish(), steps.scale)


class MeanNormMatched:
    """Another accumulator's merge rescaled to the L2 norm of the plain weighted mean
    ``‖Σ_i w_i τ_i / Σ_i w_i‖`` of the untrimmed deltas (+d floats), then multiplied by λ.

    Why (issue 17, point 4): TIES's disjoint mean keeps the full magnitude of the clients that
    agree, where FedAvg's mean shrinks with their disagreement; across federated rounds this
    makes TIES's step several times FedAvg's on the coordinates it keeps (the classifier head
    first), and the global model overshoots. Matching the norm keeps TIES's direction (trim,
    elect, disjoint merge) with FedAvg's step length."""

    def __init__(self, inner: Accumulator, layout: FlatLayout) -> None:
        self.inner, self.mean = inner, WeightedSum(layout)

    def add(self, offset: int, x: Tensor, threshold: float | None, weight: float) -> None:
        self.inner.add(offset, x, threshold, weight)
        self.mean.add(offset, x, None, weight)

    def finish(self, steps: Steps, weight_sum: float, count: int) -> Tensor:
        out = self.inner.finish(replace(steps, scale=1.0), weight_sum, count)
        target = self.mean.finish(Steps(), weight_sum, count).norm()
        have = out.norm()
        if have > 0:
            out.mul_(target / have)
        return scaled(out, steps.scale)


class MaxMagnitude:
    """Per coordinate the value with the largest ``|·|`` so far (ties: the later client);
    zero-weight clients are skipped, other weights ignored (d floats)."""

    def __init__(self, layout: FlatLayout) -> None:
        self.best = layout.zeros()

    def add(self, offset: int, x: Tensor, threshold: float | None, weight: float) -> None:
        if weight == 0:
            return
        x = kept(x, threshold)
        b = self.best[offset : offset + x.numel()]
        b.copy_(torch.where(x.abs() >= b.abs(), x, b))

    def finish(self, steps: Steps, weight_sum: float, count: int) -> Tensor:
        return scaled(self.best, steps.scale)


# ----------------------------------------------------------------------------- declaration


@dataclass(frozen=True)
class Steps:
    """One task-arithmetic-family method: which step does what (see the module docstring).

    ``sparsify``: the stages of step 1, in order. ``elect``: TIES sign election + disjoint mean
    (needs ``merge="sum"`` and ``normalize=True``). ``merge``: ``"sum"`` or ``"max-magnitude"``.
    ``normalize``: a sum is divided by ``Σ w`` (True) or by ``mean(w)`` (False). ``scale``: λ.
    """

    sparsify: tuple[Sparsifier, ...] = ()
    elect: bool = False
    merge: str = "sum"
    normalize: bool = True
    scale: float = 1.0
    #: "none", or "mean-norm": rescale the merge to the norm of the plain weighted mean
    #: (:class:`MeanNormMatched`); only with no sparsify stage or one Magnitude trim, whose
    #: pieces are the untouched deltas
    rescale: str = "none"

    def __post_init__(self) -> None:
        check_choice("merge", self.merge, MERGES)
        check_choice("rescale", self.rescale, RESCALES)
        if self.rescale != "none" and (
            len(self.sparsify) > 1 or not all(isinstance(x, Magnitude) for x in self.sparsify)
        ):  # the mean is taken of the pieces, which only a lone Magnitude stage leaves untouched
            raise ValueError("rescale='mean-norm' needs at most one sparsify stage, a Magnitude trim")
        if self.elect and (self.merge != "sum" or not self.normalize):
            raise ValueError("sign election is followed by the disjoint mean (sum, normalized)")

    @property
    def stages(self) -> tuple[Sparsifier, ...]:
        """The sparsify stages that change something."""
        return tuple(s for s in self.sparsify if not s.trivial())

    @property
    def weighted_mean(self) -> bool:
        """Whether the steps are exactly ``Σ w_i τ_i / Σ w_i`` (nothing sparsified or elected)."""
        return (
            not (self.stages or self.elect)
            and self.merge == "sum"
            and self.normalize
            and (self.scale == 1.0)
            and self.rescale == "none"
        )

    def accumulator(self, layout: FlatLayout) -> Accumulator:
        acc: Accumulator
        if self.elect:
            acc = DisjointMean(layout)
        else:
            acc = WeightedSum(layout) if self.merge == "sum" else MaxMagnitude(layout)
        return MeanNormMatched(acc, layout) if self.rescale == "mean-norm" else acc

    def sparsified(self, layout: FlatLayout, delta: Delta, key: int | None) -> Iterator[Piece]:
        """Step 1 on one client's delta."""
        flats: Sequence[Tensor] = layout.flat(delta)
        stages = self.stages
        if not stages:
            return ((off, x, None) for off, x in chunks(layout, flats))
        for stage in stages[:-1]:
            flats = _materialize(layout, stage.pieces(layout, flats, key))
        return stages[-1].pieces(layout, flats, key)


class WithOptions:
    """Mixin of mergers whose options are the frozen dataclass ``Options``.

    ``Cls(**options)`` builds ``self.options = Options(**options)``; the class takes the
    dataclass's signature, so the registry lists and checks the options by name.
    """

    Options: ClassVar[type[Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Options" in vars(cls):
            setattr(cls, "__signature__", inspect.signature(cls.Options))  # noqa: B010

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__()
        self.options = self.Options(*args, **options)

    def __repr__(self) -> str:
        opts = ", ".join(
            f"{f.name}={getattr(self.options, f.name)!r}" for f in fields(self.options)
        )
        return f"{type(self).__name__}({opts})"


def set_checked(options: object, **values: Any) -> None:
    """Store checked (normalised: ``1`` -> ``1.0``) values on a frozen options dataclass."""
    for name, value in values.items():
        object.__setattr__(options, name, value)


class TaskVectorMerger(WithOptions, StreamingMerger):
    """Streaming merger that runs ``self.options.steps()`` (a :class:`Steps`)."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.steps: Steps = self.options.steps()
        self.weighted_mean = self.steps.weighted_mean
        self._acc: Accumulator | None = None

    def _reset_state(self) -> None:
        self._acc = None

    def _begin(self, layout: FlatLayout) -> None:
        self._acc = self.steps.accumulator(layout)

    def _add(self, layout: FlatLayout, delta: Delta, weight: float, key: int | None) -> None:
        assert self._acc is not None
        for off, x, t in self.steps.sparsified(layout, delta, key):
            self._acc.add(off, x, t, weight)

    def _finish(self, layout: FlatLayout) -> Tensor:
        assert self._acc is not None
        return self._acc.finish(self.steps, self._weight_sum, self._count)
