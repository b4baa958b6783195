"""The ONE server round: decoded client updates + global state -> next global state.

::

    updates (slot order) ─▶ screens (clip-reject, direction filter: drop, with a reason)
                         ─▶ clip factors f_i = min(1, C_t / ‖Δ_i‖)   (fixed C or x the median)
                         ─▶ merge(f_i Δ_i, w_i; key_t)              (fedtune.merging)
                         ─▶ θ_{t+1} = server_opt(θ_t, merged)
                         ─▶ exact mode: residual += Σ w B_k A_k − B̄ Ā (FedEx-LoRA)

With ``dp`` (fedtune/privacy) the clip and merge steps are DP-FedAvg's instead: each update's
vector in the round's space (a linear codec's K coefficients, else the d parameters) is
clipped to C_t, the sum gets Gaussian noise, the estimate ``S / (q·n)`` is reconstructed once
and handed to the (linear) merger as one delta, then the server optimizer as above. Under
SecAgg the round receives that sum (:class:`SecureSum`) instead of the clients' updates.

The Flower strategy (:mod:`fedtune.fl.strategy`), the client's replay of a round from
payloads (:mod:`fedtune.downlink`) and the in-process simulator (:mod:`fedtune.simulate`) all
call this module; none of them re-implements a step. Who takes part and with which key
(:func:`client_key`, :func:`sample`) lives here too, so every entry point samples the same
clients and issues the same keys. Nothing here imports Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedtune import merging, rng

Tensors = dict[str, torch.Tensor]

_MERGE_TAG = 0x3E26E  # separates the merger's round key from the clients' keys
_SAMPLE_TAG = 0x5A3B1E  # and the sampling key


# --------------------------------------------------------------------------- who takes part
def client_key(run_seed: int, server_round: int, slot: int) -> int:
    """The key the server issues to client ``slot`` in ``server_round``: ``H(S, t, j)``."""
    return rng.derive_key(run_seed, server_round, slot)


def merge_key(run_seed: int, server_round: int) -> int:
    """The round key of randomized mergers (DARE's masks)."""
    return rng.derive_key(run_seed, server_round, _MERGE_TAG)


def sample(
    run_seed: int,
    server_round: int,
    n: int,
    fraction: float,
    min_nodes: int,
    *,
    poisson: bool = False,
) -> list[int]:
    """Indices (into the slot-sorted list of ``n`` connected clients) trained this round:
    ``max(⌊n·fraction⌋, min_nodes)`` of them, keyed and reproducible, in slot order.

    ``poisson=True`` (any ``dp``): each client independently with probability ``fraction``
    (a keyed uniform below it), no minimum: the sampling the DP accountant assumes."""
    if poisson:
        if fraction >= 1.0:
            return list(range(n))
        u = rng.uniform(rng.derive_key(run_seed, server_round, _SAMPLE_TAG), 1, n)
        return [i for i in range(n) if float(u[i]) < fraction]
    k = min(n, max(int(n * fraction), min_nodes))
    if k >= n:
        return list(range(n))
    pick = rng.choice(rng.derive_key(run_seed, server_round, _SAMPLE_TAG), 0, n, k)
    return sorted(pick.tolist())


def assign_slots(
    known: Mapping[int, int], unknown: Sequence[int], claimed: Mapping[int, int], fallback: int
) -> dict[int, int]:
    """Slots of the ``unknown`` node ids: the partition id each ``claimed``, when it is in
    ``[0, fallback)``, unique among the claims and not held by a ``known`` node; otherwise a
    fallback slot from ``fallback + len(known)`` upwards in node-id order. Keys are issued per
    slot, and a partition id is stable across restarts (node ids are not), which makes a
    resumed run bit-identical."""
    taken = set(known.values())
    counts: dict[int, int] = {}
    for pid in claimed.values():
        counts[pid] = counts.get(pid, 0) + 1
    out: dict[int, int] = {}
    nxt = fallback + len(known)
    for n in unknown:
        claim = claimed.get(n)
        if (
            claim is not None
            and 0 <= claim < fallback
            and counts[claim] == 1
            and claim not in taken
        ):
            out[n] = claim
        else:
            out[n] = nxt
            nxt += 1
    return out


# --------------------------------------------------------------------------- inputs / outputs
@dataclass
class Update:
    """One decoded, validated client update."""

    slot: int
    delta: Tensors
    weight: float  # merge weight (num-examples)
    loss: float = math.nan  # the client's mean training loss
    payload: bytes = b""  # what it sent (kept for the compact downlink)
    clip_bit: float = math.nan  # distributed DP, adaptive clipping: its noised 1[‖u‖ <= C]


@dataclass
class SecureSum:
    """What a SecAgg round hands the server: only the weighted mean of the contributors'
    vectors ``v_i = [u_i, b_i]`` (``u_i`` in the round's space, ``b_i`` the clip bit), their
    total weight, and per contributor its slot, weight and training loss (from its metrics)."""

    mean: torch.Tensor
    weight: float
    contributors: list[tuple[int, float, float]]  # (slot, weight, train loss)
    sampled: int


@dataclass
class RoundResult:
    """What one round did; ``state`` is the next global state (the input one if skipped)."""

    round: int
    state: Tensors
    applied: list[Update] = field(default_factory=list)  # after the screens, slot order
    factors: list[float] = field(default_factory=list)  # the clip factor of each applied update
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (slot, reason)
    skipped: bool = False
    update_norm: float = 0.0
    merge_key: int = 0
    notes: list[str] = field(default_factory=list)  # lines worth logging (scores, residual)
    privacy: dict[str, float] = field(default_factory=dict)  # dp-epsilon, ... (metrics.jsonl)

    @property
    def num_examples(self) -> int:
        return int(sum(u.weight for u in self.applied))

    @property
    def train_loss(self) -> float:
        """Example-weighted mean of the applied clients' training losses (NaN if none)."""
        finite = [(u.loss, u.weight) for u in self.applied if math.isfinite(u.loss)]
        if not finite:
            return math.nan
        return sum(lo * w for lo, w in finite) / sum(w for _, w in finite)


def decode(
    codec: Any,
    payload: bytes,
    like: Mapping[str, torch.Tensor],
    *,
    key: int,
    server_round: int,
    slot: int,
    max_norm: float = 0.0,
) -> Tensors:
    """Decode one payload with every wire check of the codec (version, layout hash, round,
    slot, key, CRC) plus finiteness and an optional norm bound; ValueError says what is wrong."""
    delta: Tensors = codec.decode(payload, like=like, key=key, round=server_round, slot=slot)
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))
    if not math.isfinite(norm):
        raise ValueError("decoded update is not finite")
    if max_norm > 0 and norm > max_norm:
        raise ValueError(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return delta


# --------------------------------------------------------------------------- screens
class Screen(Protocol):
    """Drops updates before the merge: ``screen(deltas, slots)`` -> (index -> reason, notes)."""

    def screen(
        self, deltas: Sequence[Tensors], slots: Sequence[int]
    ) -> tuple[dict[int, str], list[str]]: ...


class ClipReject:
    """Drop (not clip) updates whose norm is over ``clip-reject`` x the round's clip bound."""

    def __init__(self, clip: merging.NormClip) -> None:
        self.clip = clip

    def screen(
        self, deltas: Sequence[Tensors], slots: Sequence[int]
    ) -> tuple[dict[int, str], list[str]]:
        r = self.clip.reject
        out = {
            i: f"norm {n:.4g} is {n / bound:.3g}x the round's clip bound {bound:.4g} "
            f"(clip-reject {r:g})"
            for i, n, bound in self.clip.oversized(deltas)
        }
        return out, []


class DirectionFilter:
    """Drop updates whose cosine with the others' median direction is an outlier below the
    threshold (:class:`fedtune.merging.CosineFilter`); its memory is part of the round state."""

    def __init__(self, inner: merging.CosineFilter) -> None:
        self.inner = inner

    def screen(
        self, deltas: Sequence[Tensors], slots: Sequence[int]
    ) -> tuple[dict[int, str], list[str]]:
        scored = dict(self.inner.outliers(list(deltas), list(slots)))
        notes = []
        if self.inner.last_scores:  # every score, so a false drop can be traced
            shown = ", ".join(
                f"{s}: {x:.3f}" for s, x in zip(slots, self.inner.last_scores, strict=True)
            )
            notes.append(f"direction scores by slot: {shown}")
        what = "mean cosine over its rounds" if self.inner.memory else "cosine"
        out = {
            i: f"direction filter: {what} {cos:.3f} with the other clients' median direction "
            f"is below {self.inner.threshold:g} and an outlier this round"
            for i, cos in scored.items()
        }
        return out, notes

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(dict(sd))


# --------------------------------------------------------------------------- the round
def clip_factors(clip: merging.NormClip | None, deltas: Sequence[Tensors]) -> list[float]:
    """The scale the round applies to each delta: ``min(1, C_t/‖Δ_i‖)``, C_t this round's bound."""
    if clip is None or not deltas:
        return [1.0] * len(deltas)
    bound = clip.for_round(deltas)
    return [bound.factor(d) for d in deltas]


def scaled(delta: Tensors, factor: float) -> Tensors:
    """``factor · delta`` (a float32 tensor times a Python float, as NormClip does)."""
    return dict(delta) if factor == 1.0 else {k: t * factor for k, t in delta.items()}


def apply_updates(
    state: Mapping[str, torch.Tensor],
    deltas: Sequence[Tensors],
    weights: Sequence[float],
    factors: Sequence[float],
    *,
    merger: Any,
    server_opt: Any,
    key: int,
) -> tuple[Tensors, Tensors]:
    """(next state, merged delta): clip-scale, merge, server optimizer. The replay of a round
    by a client (:func:`fedtune.downlink.apply_step`) is this function with the factors the
    server sent."""
    clipped = [scaled(d, f) for d, f in zip(deltas, factors, strict=True)]
    merged = merging.aggregate(merger, clipped, list(weights), clip=None, key=key)
    return server_opt.step(state, merged), merged


class ServerRound:
    """The server's round with its parts injected (built by :func:`fedtune.parts.server_round`)."""

    def __init__(
        self,
        *,
        merger: Any,
        server_opt: Any,
        run_seed: int,
        clip: merging.NormClip | None = None,
        screens: Sequence[Screen] = (),
        exact: Any = None,
        min_valid: int = 1,
        dp: Any = None,
        space: Any = None,
    ) -> None:
        self.merger = merger
        self.server_opt = server_opt
        self.run_seed = run_seed
        self.clip = clip
        self.screens = list(screens)
        # factor-mode='exact': a fedtune.adapters.exact.ExactResidual (FedEx-LoRA), else None
        self.exact = exact
        self.min_valid = min_valid
        # dp: a fedtune.privacy.DPFedAvg or None; space: the fedtune.privacy.Space its
        # vectors (and SecAgg's sums) live in
        self.dp = dp
        self.space = space

    def budget_exhausted(self) -> bool:
        """True when the next round would spend more than ``dp-target-epsilon``."""
        return self.dp is not None and bool(self.dp.exhausted())

    @property
    def direction_filter(self) -> DirectionFilter | None:
        return next((s for s in self.screens if isinstance(s, DirectionFilter)), None)

    def __call__(
        self,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        *,
        secure: SecureSum | None = None,
        sampled: int | None = None,
    ) -> RoundResult:
        """Screens, clip, merge, server optimizer and (exact mode) the residual, in slot order
        (arrival order varies between runs; the result must not). With DP or a SecAgg sum
        the private path below (``sampled``: how many clients were asked)."""
        kept = sorted(updates, key=lambda u: u.slot)
        res = RoundResult(
            server_round, dict(state), merge_key=merge_key(self.run_seed, server_round)
        )
        if self.dp is not None or secure is not None:
            return self._private(res, state, kept, secure, sampled)
        for s in self.screens:
            out, notes = s.screen([u.delta for u in kept], [u.slot for u in kept])
            res.notes += notes
            res.dropped += [(kept[i].slot, why) for i, why in sorted(out.items())]
            kept = [u for i, u in enumerate(kept) if i not in out]
        res.applied = kept
        if len(kept) < self.min_valid:
            res.skipped = True
            res.notes.append(
                f"only {len(kept)} valid replies (< {self.min_valid}): keeping the previous "
                "global adapter"
            )
            return res
        deltas = [u.delta for u in kept]
        weights = [u.weight for u in kept]
        res.factors = clip_factors(self.clip, deltas)
        res.state, merged = apply_updates(
            state,
            deltas,
            weights,
            res.factors,
            merger=self.merger,
            server_opt=self.server_opt,
            key=res.merge_key,
        )
        res.update_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in merged.values()))
        if self.exact is not None:  # FedEx-LoRA: fold Σ w B_k A_k − B̄Ā into the base
            clipped = [scaled(d, f) for d, f in zip(deltas, res.factors, strict=True)]
            r_norm = self.exact.update(dict(state), clipped, weights, res.state)
            res.notes.append(f"exact-mode residual increment norm {r_norm:.4g}")
        return res

    def _private(
        self,
        res: RoundResult,
        state: Mapping[str, torch.Tensor],
        kept: list[Update],
        secure: SecureSum | None,
        sampled: int | None,
    ) -> RoundResult:
        """DP-FedAvg and/or a SecAgg sum: (clip, noise) -> estimate -> one reconstruction ->
        the linear merger on that one delta -> server optimizer. fedtune.parts refused
        screens, exact mode and non-linear mergers before round 1."""
        t, space = res.round, self.space
        if space is None:
            raise ValueError("a private round needs the vector space of its codec")
        dim = space.dim(t)
        if secure is not None:
            res.applied = [Update(s, {}, w, lo) for s, w, lo in secure.contributors]
            if secure.mean.numel() != dim + 1:
                raise ValueError(f"secure sum has {secure.mean.numel()} entries, want {dim + 1}")
            if self.dp is None:
                if len(res.applied) < self.min_valid:
                    res.skipped = True
                    res.notes.append(f"SecAgg: {len(res.applied)} contributors (< {self.min_valid})")
                    return res
                vec = secure.mean[:dim]
            else:  # unit weights under DP: the mean times the count is the sum
                total = secure.mean.double() * secure.weight
                rel = self.dp.release(
                    t,
                    summed=total[:dim].float(),
                    bit_sum=float(total[dim]),
                    count=len(res.applied),
                    sampled=secure.sampled,
                    dim=dim,
                )
        else:
            res.applied = kept
            rel = self.dp.release(
                t,
                vectors=[space.vector(u.payload, u.delta) for u in kept],
                bits=[u.clip_bit for u in kept],
                sampled=sampled if sampled is not None else len(kept),
                dim=dim,
            )
        if self.dp is not None:
            res.privacy, res.factors = rel.info, rel.factors
            if rel.note:
                res.notes.append(rel.note)
            if rel.vector is None:
                res.skipped = True
                return res
            vec = rel.vector
        est = space.delta(vec, t)
        res.state, merged = apply_updates(
            state, [est], [1.0], [1.0], merger=self.merger, server_opt=self.server_opt,
            key=res.merge_key,
        )  # fmt: skip
        res.update_norm = math.sqrt(sum(float(x.double().pow(2).sum()) for x in merged.values()))
        return res

    # ---------------------------------------------------------------- state across rounds
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep besides the adapter: optimizer, filter memory, residual."""
        f = self.direction_filter
        extra: dict[str, Any] = {"direction-filter": f.state_dict()} if f is not None else {}
        if self.dp is not None:  # accountant rounds and the adaptive clip norm
            extra["privacy"] = self.dp.state_dict()
        return {
            "server_opt": self.server_opt.state_dict(),
            "extra": extra,
            "residual": dict(self.exact.residual) if self.exact is not None else {},
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.server_opt.load_state_dict(sd.get("server_opt", {}))
        f = self.direction_filter
        if f is not None:
            f.load_state_dict(sd.get("extra", {}).get("direction-filter", {}))
        if self.exact is not None:
            self.exact.load_state_dict(sd.get("residual", {}))
        if self.dp is not None:
            self.dp.load_state_dict(dict(sd.get("extra", {}).get("privacy", {})))

    @property
    def residual(self) -> Tensors | None:
        return self.exact.residual if self.exact is not None else None
