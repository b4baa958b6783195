"""``subspace``: train in the round's seeded subspace, send its K coordinates (issue 17).

Each round ``t`` every client trains ``θ = θ_t + P_t z`` with ``z ∈ R^K`` (first-order AdamW on
``z``; the gradient is ``∇_z = P_tᵀ ∇_θ``, the chain rule through the linear map) and sends
``z``. The update *is* ``P_t z``, so the server's reconstruction loses nothing (to fp32
rounding, or fp16 rounding of ``z``), and since every client of a round shares ``P_t``,
FedAvg of the reconstructions equals ``P_t`` times the mean ``z``: the average is exact. This
is the intrinsic-dimension view of fine-tuning (Li et al. 2018; Aghajanyan et al. 2021) made
federated, with a fresh subspace every round so that the span grows with the rounds, unlike
FedKSeed's fixed seed pool (research note ``seed_projection.md`` §2).

``P_t`` is an SRHT per block: ``P_l = α_l D_l Hᵀ S_lᵀ`` (signs ``D``, orthonormal Walsh–Hadamard
``H`` of the block padded to ``n_l = 2^⌈log2 d_l⌉``, ``K_l`` rows ``S``), truncated to the
block's ``d_l`` coordinates, with ``α_l = √(n_l/K_l)`` so that one Adam step on ``z`` moves
``θ`` by about as much as one dense Adam step. ``P`` is applied with
:meth:`fedtune.codecs.srht.SRHTCodec.reconstruct_blocks` and its adjoint with
``project_blocks`` (``O(d log d)`` both ways, integer-exact randomness, bit-identical on every
device). Its key is the *round* key ``H(seed, t, tag)`` (:func:`round_key`), never the
client's key: the codec option ``seed`` must be the run seed (``codec-seed``; the frontier
benchmark sets it), a different value only changes which subspaces the run visits.

Blocks: the LoRA (non-head) tensors are concatenated into one vector, cut into blocks of at
most ``max_block`` elements, ``K_l ∝ d_l``. The task head (tensors whose name contains
``head_match``, default ``classifier``) is either a separate subspace block of ``head_k``
coefficients (``head='subspace'``), trained as ordinary parameters and sent dense in
``head_bits`` (``head='dense'``), or left at its initial value (``head='frozen'``).

Payload (the shared wire format, :mod:`fedtune.codecs.wire`, codec id 171): the K table holds
the ``K_l`` of the subspace blocks followed by ``d_h`` of each dense head tensor; the header's
coefficient dtype is that of ``z`` (``coef_bits`` 32 / 16 / 8), the head's is ``head_bits``;
the layout hash covers the tensors and the codec's options, so a server configured
differently rejects the payload instead of decoding another subspace.

Use ``trainer='subspace' codec='subspace'``. Because :class:`fedtune.trainers.LocalJob` does
not carry the server round, the trainer returns a :class:`PendingSubspace` and the training
runs inside ``codec.encode(update, key, round=t, ...)``, the first place the round is known
(``client_round`` builds its metrics after encoding, so the train loss still arrives). Given
a plain dense delta, ``encode`` sends its coordinates ``z = P_tᵀΔ / α²`` (the orthogonal
projection when blocks are powers of two), so the codec also works with ``trainer='first-order'``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from fedtune import rng, trainers
from fedtune.codecs import quantize as q
from fedtune.codecs import wire
from fedtune.codecs.base import (
    Codec,
    Delta,
    PayloadError,
    check_ids,
    check_spec,
    empty_like_spec,
    spec_hash,
)
from fedtune.codecs.registry import register
from fedtune.codecs.srht import SRHTCodec, _pow2
from fedtune.layout import combine_hashes

Tensors = dict[str, torch.Tensor]
#: a subspace trainer: (job, codec, server round, metrics to fill) -> the update
TrainFn = Callable[..., "SubspaceUpdate"]

CODEC_ID = 171
_ROUND_TAG = 0x5B5ACE  # separates the subspace's round key from client, merge and sample keys
HEAD_MODES = ("subspace", "dense", "frozen")

if wire.CODEC_IDS.get("subspace") != CODEC_ID:
    wire.register_codec_id("subspace", CODEC_ID)


def round_key(seed: int, server_round: int) -> int:
    """The key of round ``server_round``'s subspace: one for every client of the round."""
    return rng.derive_key(seed, server_round, _ROUND_TAG)


def split_k(sizes: list[int], total: int) -> list[int]:
    """Integer ``K_l ∝ d_l`` with ``1 <= K_l <= d_l`` and ``Σ K_l = total`` (largest remainder)."""
    d = sum(sizes)
    if not 1 <= total <= d or total < len(sizes):
        raise ValueError(f"k={total} must be in [{len(sizes)}, {d}] for blocks {sizes}")
    share = [total * s / d for s in sizes]
    ks = [min(s, max(1, math.floor(x))) for s, x in zip(sizes, share, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: (-(share[i] - math.floor(share[i])), i))
    i = 0
    while sum(ks) < total:
        j = order[i % len(order)]
        if ks[j] < sizes[j]:
            ks[j] += 1
        i += 1
    while sum(ks) > total:  # the max(1, .) floor overshot: take from the largest
        j = max(range(len(ks)), key=lambda m: ks[m])
        ks[j] -= 1
    return ks


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which tensors form the subspace vector, which are the dense head, which are frozen,
    and the subspace blocks ``(start, stop, K_l)`` over the concatenated vector."""

    sub: tuple[str, ...]
    head: tuple[str, ...]
    frozen: tuple[str, ...]
    blocks: tuple[tuple[int, int, int], ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def k(self) -> int:
        return sum(kk for _, _, kk in self.blocks)

    @property
    def d(self) -> int:
        return self.blocks[-1][1] if self.blocks else 0


class Basis:
    """``P`` (``K -> d``) and its adjoint ``Pᵀ`` for one layout and one round key."""

    def __init__(self, layout: Layout, key: int) -> None:
        self.layout, self.key = layout, key
        self._srht = SRHTCodec()
        self.alpha = [math.sqrt(_pow2(b - a) / kk) for a, b, kk in layout.blocks]

    def _zs(self, z: torch.Tensor) -> list[torch.Tensor]:
        out, pos = [], 0
        for _, _, kk in self.layout.blocks:
            out.append(z[pos : pos + kk])
            pos += kk
        return out

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """``P z``: fp32 CPU vector of length d."""
        z = z.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
        if z.numel() != self.layout.k:
            raise ValueError(f"z has {z.numel()} entries, the subspace has {self.layout.k}")
        items = [
            (zl.contiguous(), b - a, i)
            for i, ((a, b, _), zl) in enumerate(zip(self.layout.blocks, self._zs(z), strict=True))
        ]
        rec = self._srht.reconstruct_blocks(items, self.key)
        # reconstruct = (n/K) P0 y; P = α P0  =>  P z = α (K/n) reconstruct(z)
        parts = [
            r * float(al * kk / _pow2(b - a))
            for r, al, (a, b, kk) in zip(rec, self.alpha, self.layout.blocks, strict=True)
        ]
        return torch.cat(parts) if parts else torch.zeros(0)

    def adjoint(self, v: torch.Tensor) -> torch.Tensor:
        """``Pᵀ v``: fp32 CPU vector of length K."""
        v = v.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
        if v.numel() != self.layout.d:
            raise ValueError(f"v has {v.numel()} entries, the subspace vector has {self.layout.d}")
        items = [(v[a:b].contiguous(), kk, i) for i, (a, b, kk) in enumerate(self.layout.blocks)]
        proj = self._srht.project_blocks(items, self.key)  # project = P0ᵀ (padding is zeros)
        parts = [p * float(al) for p, al in zip(proj, self.alpha, strict=True)]
        return torch.cat(parts) if parts else torch.zeros(0)


@dataclasses.dataclass(frozen=True)
class SubspaceUpdate:
    """What the codec sends: the subspace coordinates and the dense head delta (if any)."""

    z: torch.Tensor
    head: Mapping[str, torch.Tensor]
    like: Mapping[str, torch.Tensor]


class PendingSubspace:
    """The ``subspace`` trainer's result: the local job, trained when the codec learns the
    round (``run``); ``metrics`` is the dict the trainer returned, filled in by the training."""

    def __init__(
        self, job: trainers.LocalJob, metrics: dict[str, float], train: TrainFn | None = None
    ) -> None:
        self.job, self.metrics = job, metrics
        self.train = train if train is not None else train_subspace
        self.done: SubspaceUpdate | None = None

    def run(self, codec: SubspaceCodec, server_round: int) -> SubspaceUpdate:
        if self.done is None:
            self.done = self.train(self.job, codec, server_round, self.metrics)
        return self.done


@register("subspace")
@dataclasses.dataclass
class SubspaceCodec(Codec):
    """Options: ``k`` (coordinates of the subspace per round), ``coef_bits`` (32 / 16 / 8 for
    z), ``head`` ('subspace' | 'dense' | 'frozen'), ``head_bits`` (dense head: 32 / 16 / 8),
    ``head_k`` (subspace head: its coordinates out of ``k``, default a share ∝ its size, at
    least 16),
    ``head_match`` (name substring of head tensors), ``lr`` / ``head_lr`` (AdamW learning
    rates of z and of the dense head; default the client ``lr``), ``seed`` (the run seed: the
    round keys derive from it), ``max_block``."""

    k: int = 1024
    coef_bits: int = 32
    head: str = "subspace"
    head_bits: int = 16
    head_k: int | None = None
    head_match: str = "classifier"
    lr: float | None = None
    head_lr: float | None = None
    seed: int = 0
    max_block: int = 1 << 20

    name: ClassVar[str] = "subspace"
    zeroth_order: ClassVar[bool] = False  # first-order trainer (parts.validate pairs on this)
    #: Δ = P_t z (+ the dense head) with P_t shared by every client of round t
    linear: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        self._coef = q.coef_from_bits(self.coef_bits, (32, 16, 8))
        self._head_coef = q.coef_from_bits(self.head_bits, (32, 16, 8))
        if self.head not in HEAD_MODES:
            raise ValueError(f"head must be one of {', '.join(HEAD_MODES)}, got {self.head!r}")
        if self.head_k is not None and (not isinstance(self.head_k, int) or self.head_k < 1):
            raise ValueError(f"head_k must be a positive int, got {self.head_k!r}")
        for what in ("lr", "head_lr"):
            v = getattr(self, what)
            if v is not None:
                if not float(v) > 0:
                    raise ValueError(f"{what} must be > 0, got {v!r}")
                setattr(self, what, float(v))
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.max_block, int) or self.max_block < 2:
            raise ValueError(f"max_block must be an int >= 2, got {self.max_block!r}")

    # --- layout and basis ----------------------------------------------------------------------

    def layout(self, like: Delta) -> Layout:
        names = list(like)
        is_head = [self.head_match != "" and self.head_match in n for n in names]
        body = [n for n, h in zip(names, is_head, strict=True) if not h]
        head_names = [n for n, h in zip(names, is_head, strict=True) if h]
        size = {n: like[n].numel() for n in names}
        sub, head, frozen = list(body), [], []
        if self.head == "subspace":
            sub += head_names
        elif self.head == "dense":
            head = head_names
        else:
            frozen = head_names
        d_body = sum(size[n] for n in body)
        d_head = sum(size[n] for n in head_names) if self.head == "subspace" else 0
        if d_body == 0:
            raise ValueError("the subspace holds no tensor (every tensor matched head_match)")
        k_head = 0
        if d_head:
            share = math.ceil(self.k * d_head / (d_body + d_head))
            k_head = min(d_head, self.head_k if self.head_k is not None else max(16, share))
        k_body = self.k - k_head
        if k_body < 1:
            raise ValueError(f"k={self.k} leaves no coordinate for the body (head takes {k_head})")
        # the body vector cut into at most max_block-sized pieces, then the head piece
        pieces = max(1, math.ceil(d_body / self.max_block))
        sizes = [d_body * (p + 1) // pieces - d_body * p // pieces for p in range(pieces)]
        ks = split_k(sizes, min(k_body, d_body))
        blocks, pos = [], 0
        for s, kk in zip(sizes, ks, strict=True):
            blocks.append((pos, pos + s, kk))
            pos += s
        if d_head:
            blocks.append((pos, pos + d_head, k_head))
        shapes = tuple((n, tuple(like[n].shape)) for n in names)
        return Layout(tuple(sub), tuple(head), tuple(frozen), tuple(blocks), shapes)

    def basis(self, like: Delta, server_round: int) -> Basis:
        return Basis(self.layout(like), round_key(self.seed, server_round))

    def _layout_hash(self, like: Delta) -> int:
        opts = rng.derive_key(
            self.k, self._coef, HEAD_MODES.index(self.head), self._head_coef,
            self.head_k or 0, self.max_block, int.from_bytes(self.head_match.encode(), "little"),
        )  # fmt: skip
        return combine_hashes(spec_hash(like, self.layout_salt), opts)

    def _table(self, lay: Layout, like: Delta) -> list[int]:
        return [kk for _, _, kk in lay.blocks] + [like[n].numel() for n in lay.head]

    def max_payload_bytes(self, like: Delta) -> int:
        lay = self.layout(like)
        ks = self._table(lay, like)
        return wire.max_size(len(ks), 4 * sum(ks))

    # --- encode / decode -----------------------------------------------------------------------

    def encode(self, delta: Any, key: int, *, round: int = 0, slot: int = 0) -> bytes:
        check_ids(key, round, slot)
        if isinstance(delta, PendingSubspace):
            delta = delta.run(self, round)
        if isinstance(delta, SubspaceUpdate):
            like, z, head = delta.like, delta.z, dict(delta.head)
            lay = self.layout(like)
        else:
            check_spec(delta)
            like = delta
            lay = self.layout(like)
            flat = _flat(delta, lay.sub)
            if not torch.isfinite(flat).all():
                raise ValueError("delta contains non-finite values")
            b = Basis(lay, round_key(self.seed, round))
            z = b.adjoint(flat)
            inv = torch.cat(
                [
                    torch.full((kk,), 1.0 / al**2)
                    for (_, _, kk), al in zip(lay.blocks, b.alpha, strict=True)
                ]
            )
            z = z * inv
            head = {n: delta[n] for n in lay.head}
        z = z.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        if z.numel() != lay.k:
            raise ValueError(f"z has {z.numel()} entries, the subspace has {lay.k}")
        if not torch.isfinite(z).all():
            raise ValueError("subspace coordinates are not finite")
        body, scales, pos = [], [], 0
        for i, (_, _, kk) in enumerate(lay.blocks):
            raw, s = q.quantize(z[pos : pos + kk], self._coef, key=key, stream=i)
            body.append(raw)
            scales.append(s)
            pos += kk
        for j, n in enumerate(lay.head):
            if n not in head:
                raise ValueError(f"head='dense' but the update has no delta for {n!r}")
            t = head[n].detach().to(device="cpu", dtype=torch.float32).reshape(-1)
            if t.numel() != like[n].numel() or not torch.isfinite(t).all():
                raise ValueError(f"head delta {n!r} has the wrong size or non-finite values")
            raw, s = q.quantize(t, self._head_coef, key=key, stream=len(lay.blocks) + j)
            body.append(raw)
            scales.append(s)
        has_scales = self._coef != wire.COEF_FP32 or (
            lay.head and self._head_coef != wire.COEF_FP32
        )
        flags = wire.FLAG_SCALES if has_scales else 0
        if wire.COEF_INT8 in (self._coef, self._head_coef if lay.head else None):
            flags |= wire.FLAG_STOCHASTIC
        header = wire.Header(
            codec_id=wire.codec_id(self.name),
            coef=self._coef,
            flags=flags,
            round=round,
            slot=slot,
            key=key,
            layout=self._layout_hash(like),
            ks=tuple(self._table(lay, like)),
            scales=tuple(scales) if has_scales else None,
        )
        return wire.pack(header, b"".join(body))

    def coefficients(self, payload: bytes, like: Delta) -> tuple[torch.Tensor, Tensors, int]:
        """(z, dense head tensors, round) of a payload, after every wire check."""
        check_spec(like)
        lay = self.layout(like)
        table = self._table(lay, like)
        h, body = wire.unpack(payload, self.max_payload_bytes(like))
        wire.check_header(
            h,
            codec=self.name,
            layout=self._layout_hash(like),
            n_blocks=len(table),
            key=None,
            round=None,
            slot=None,
        )
        if h.coef != self._coef:
            raise PayloadError(
                f"coefficient dtype {wire.COEF_NAMES[h.coef]} differs from the codec's "
                f"{wire.COEF_NAMES[self._coef]}"
            )
        if list(h.ks) != table:
            raise PayloadError("K table does not match this codec's subspace layout")
        coefs = [self._coef] * len(lay.blocks) + [self._head_coef] * len(lay.head)
        has_scales = any(c != wire.COEF_FP32 for c in coefs)
        if bool(h.flags & wire.FLAG_SCALES) != has_scales:
            raise PayloadError("scale table presence does not match the coefficient dtypes")
        if h.flags & wire.FLAG_SHRINK:
            raise PayloadError("the subspace codec never shrinks (flag set)")
        want = sum(q.nbytes(c, kk) for c, kk in zip(coefs, table, strict=True))
        if len(body) != want:
            raise PayloadError(f"body length {len(body)} does not match the K table ({want})")
        vals, pos = [], 0
        for i, (c, kk) in enumerate(zip(coefs, table, strict=True)):
            nb = q.nbytes(c, kk)
            s = h.scales[i] if h.scales is not None else 1.0
            vals.append(q.dequantize(body[pos : pos + nb], kk, c, s))
            pos += nb
        nb_sub = len(lay.blocks)
        z = torch.cat(vals[:nb_sub]) if nb_sub else torch.zeros(0)
        head = {n: v.view(like[n].shape) for n, v in zip(lay.head, vals[nb_sub:], strict=True)}
        return z, head, h.round

    def decode(
        self,
        payload: bytes,
        like: Delta,
        *,
        key: int | None = None,
        round: int | None = None,
        slot: int | None = None,
    ) -> dict[str, torch.Tensor]:
        check_spec(like)
        h, _ = wire.unpack(payload, self.max_payload_bytes(like))
        for what, want, got in (("round", round, h.round), ("slot", slot, h.slot)):
            if want is not None and got != want:
                raise PayloadError(f"{what} mismatch: payload says {got}, expected {want}")
        if key is not None and h.key != key:
            raise PayloadError("key mismatch: payload was not encoded with the key issued to it")
        z, head, t = self.coefficients(payload, like)
        lay = self.layout(like)
        out = empty_like_spec(like)
        _unflat(Basis(lay, round_key(self.seed, t)).apply(z), lay.sub, out)
        for n, v in head.items():
            out[n].copy_(v)
        for n, v in out.items():
            if not torch.isfinite(v).all():
                raise PayloadError(f"{n} decodes to non-finite values")
        return out

    # --- the coefficient view of a linear codec (fedtune/privacy/space.py) ------------------
    # u = (α_l z_l per block, then the dense head): ‖P_t z‖ <= ‖α ⊙ z‖ since P_l = α_l times a
    # partial isometry (signs, orthonormal Hadamard, row selection, truncation)

    def _gain(self, lay: Layout) -> torch.Tensor:
        return torch.cat(
            [torch.full((kk,), math.sqrt(_pow2(b - a) / kk)) for a, b, kk in lay.blocks]
        )

    def coef_dim(self, like: Delta) -> int:
        lay = self.layout(like)
        return lay.k + sum(like[n].numel() for n in lay.head)

    def coef_vector(self, payload: bytes, like: Delta) -> tuple[torch.Tensor, int]:
        """(``u = α ⊙ z`` followed by the dense head, the payload's round)."""
        z, head, t = self.coefficients(payload, like)
        lay = self.layout(like)
        parts = [z * self._gain(lay)] + [head[n].reshape(-1) for n in lay.head]
        return torch.cat(parts).to(torch.float32), t

    def _split(self, u: torch.Tensor, like: Delta) -> tuple[Layout, torch.Tensor, Tensors]:
        lay = self.layout(like)
        u = u.detach().to("cpu", torch.float32).reshape(-1)
        if u.numel() != self.coef_dim(like):
            raise ValueError(f"u has {u.numel()} entries, the codec {self.coef_dim(like)}")
        z = u[: lay.k] / self._gain(lay)
        head, pos = {}, lay.k
        for n in lay.head:
            head[n] = u[pos : pos + like[n].numel()].reshape(like[n].shape).clone()
            pos += like[n].numel()
        return lay, z, head

    def from_coef(self, u: torch.Tensor, like: Delta, server_round: int) -> Tensors:
        """``P_t z`` (+ head) of a coefficient vector: one reconstruction for a whole sum."""
        lay, z, head = self._split(u, like)
        out = empty_like_spec(like)
        _unflat(Basis(lay, round_key(self.seed, server_round)).apply(z), lay.sub, out)
        for n, v in head.items():
            out[n].copy_(v)
        return out

    def encode_coef(
        self, u: torch.Tensor, like: Delta, *, key: int, round: int, slot: int
    ) -> bytes:
        _, z, head = self._split(u, like)
        return self.encode(SubspaceUpdate(z, head, like), key, round=round, slot=slot)


def _flat(state: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([state[n].detach().to("cpu", torch.float32).reshape(-1) for n in names])


def _unflat(v: torch.Tensor, names: tuple[str, ...], out: Mapping[str, torch.Tensor]) -> None:
    pos = 0
    for n in names:
        t = out[n]
        t.view(-1).copy_(v[pos : pos + t.numel()])
        pos += t.numel()


# --------------------------------------------------------------------------- the trainer
def deferred(job: trainers.LocalJob, name: str, train: TrainFn) -> trainers.LocalResult:
    """A subspace trainer's result: ``train`` runs inside ``codec.encode`` (which knows the
    round); its metrics dict is filled in then."""
    if not isinstance(job.codec, SubspaceCodec):
        raise TypeError(f"trainer {name!r} needs codec='subspace', got {type(job.codec).__name__}")
    metrics = {
        "train-loss": math.nan,
        "num-examples": float(job.spec.steps * job.spec.batch_size),
        "local-steps": float(job.spec.steps),
    }
    return trainers.LocalResult(PendingSubspace(job, metrics, train), metrics)


@trainers.register("subspace")  # type: ignore[arg-type]  # Registry[Trainer] types factories
def subspace_trainer(job: trainers.LocalJob) -> trainers.LocalResult:
    """Defers the AdamW steps on ``z`` to ``codec.encode`` (which knows the round)."""
    return deferred(job, "subspace", train_subspace)


@dataclasses.dataclass
class Session:
    """What every subspace trainer starts from: the round's basis at ``θ_t``, ``z = 0`` and
    AdamW over ``z`` (rate ``codec.lr``) and the dense head (``codec.head_lr``)."""

    params: dict[str, torch.nn.Parameter]
    like: Tensors
    basis: Basis
    theta0: torch.Tensor
    z: torch.Tensor
    head: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer

    @classmethod
    def begin(
        cls, job: trainers.LocalJob, codec: SubspaceCodec, server_round: int, *, z_grad: bool
    ) -> Session:
        spec = job.spec
        like = {n: t.detach().to("cpu", torch.float32) for n, t in job.global_state.items()}
        params = {n: p for n, p in job.model.named_parameters() if p.requires_grad}
        if set(params) != set(like):
            raise ValueError("the model's trainable parameters do not match the global state")
        basis = codec.basis(like, server_round)
        z = torch.zeros(basis.layout.k, requires_grad=z_grad)
        head = [params[n] for n in basis.layout.head]
        s = spec.lr_scale  # the lr schedule scales the rates of z and of the head alike
        groups: list[dict[str, Any]] = [{"params": [z], "lr": (codec.lr or spec.lr) * s}]
        if head:
            groups.append({"params": head, "lr": (codec.head_lr or spec.lr) * s})
        opt = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
        theta0 = _flat(like, basis.layout.sub)
        job.model.to(job.device)
        job.model.train()
        return cls(params, like, basis, theta0, z, head, opt)

    def move_to(self, z: torch.Tensor) -> None:
        """Set the body's parameters to ``θ_t + P_t z``."""
        _set(self.params, self.basis.layout.sub, self.theta0 + self.basis.apply(z))

    def finish(
        self, job: trainers.LocalJob, metrics: dict[str, float] | None, total: float, seen: int
    ) -> SubspaceUpdate:
        """Model back to eval; mean train loss and examples into ``metrics``; the update."""
        job.model.zero_grad(set_to_none=True)
        job.model.eval()
        steps = job.spec.steps
        if metrics is not None:
            metrics["train-loss"] = total / steps if steps else math.nan
            metrics["num-examples"] = float(seen)
        lay, p = self.basis.layout, self.params
        head_delta = {n: p[n].detach().to("cpu", torch.float32) - self.like[n] for n in lay.head}
        return SubspaceUpdate(self.z.detach().clone(), head_delta, self.like)


def train_subspace(
    job: trainers.LocalJob,
    codec: SubspaceCodec,
    server_round: int,
    metrics: dict[str, float] | None = None,
) -> SubspaceUpdate:
    """``spec.steps`` AdamW steps on ``z`` (and on the dense head), ``θ = θ_t + P_t z``."""
    from fedtune.train import to_device

    model, spec, dev = job.model, job.spec, job.device
    ses = Session.begin(job, codec, server_round, z_grad=True)
    params, basis, lay, z, head, opt = (
        ses.params, ses.basis, ses.basis.layout, ses.z, ses.head, ses.opt,
    )  # fmt: skip
    total, seen = 0.0, 0
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(job.data_key & 0x7FFF_FFFF_FFFF_FFFF)
        for _ in range(spec.steps):
            batch = to_device(next(job.batches), dev)
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower lr")
            model.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            g = torch.cat([_grad(params[n]) for n in lay.sub])
            z.grad = basis.adjoint(g)
            if spec.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([z, *head], spec.grad_clip)
            opt.step()
            ses.move_to(z)
            total += loss.item()
            seen += int(batch["input_ids"].shape[0])
    return ses.finish(job, metrics, total, seen)


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        return torch.zeros(p.numel())
    return p.grad.detach().to("cpu", torch.float32).reshape(-1)


def _set(params: Mapping[str, torch.nn.Parameter], names: tuple[str, ...], v: torch.Tensor) -> None:
    pos = 0
    with torch.no_grad():
        for n in names:
            p = params[n]
            p.copy_(v[pos : pos + p.numel()].view(p.shape).to(p.device, p.dtype))
            pos += p.numel()
