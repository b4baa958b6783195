"""Shared machinery of the seed-projection codecs (Ferret-style random sketches).

Ferret (Shu et al., ICML'25, arXiv 2409.06277) sends, per block l, K_l coefficients
``y_l = A_l Δ_l`` of a random sketch ``A_l`` that the server regenerates from the issued key,
and reconstructs the unbiased estimate ``Δ̂_l = c_l A_lᵀ y_l`` (eq. 6–8; ``c_l = 1/(ρK_l)``
for dense bases). Every unbiased rank-K sketch has ``E‖Δ̂−Δ‖² ≈ (d/K)‖Δ‖²`` (research note
§4), so the bases differ only in cost and portability; each subclass supplies the sketch
(``project`` / ``reconstruct``) and its exact variance factor ``omega(d, K)``.

Budget split (note §4): ``K_l ∝ √d_l ‖Δ_l‖`` minimises ``Σ (d_l/K_l)‖Δ_l‖²`` subject to
``Σ K_l = K``; every non-zero block gets at least ``min_per_block`` coefficients, zero blocks
get none, and a block whose share reaches ``d_l`` is sent dense (``K_l = d_l``, exact).

Randomness: block ``l``'s sketch comes from ``rng`` streams derived from ``(key, l)`` only,
so the decoder needs nothing but the key and the layout. The integer parts (signs, hashes,
row choices) are bit-identical on every device; see each basis for what that implies for
the decoded floats.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

import fedtune.codecs.quantize as q
import fedtune.codecs.wire as wire
from fedtune.codecs.base import (
    Block,
    Codec,
    Delta,
    PayloadError,
    check_delta,
    check_ids,
    check_spec,
    empty_like_spec,
    make_blocks,
    spec_hash,
    sq_norm,
)


def default_k(d: int, compression: float) -> int:
    """The note's default budget: ``clamp(d / compression, 4096, 65536)`` (never above d)."""
    return min(d, max(4096, min(65536, math.ceil(d / compression))))


def allocate(sizes: list[int], norms: list[float], total: int, min_k: int) -> list[int]:
    """Integer ``K_l ∝ √d_l ‖Δ_l‖`` with ``min_k <= K_l <= d_l`` and ``Σ K_l = total``.

    Water-filling: blocks whose share would reach ``d_l`` are fixed dense, blocks below
    ``min_k`` are raised to it, the rest share what remains; largest remainders round.
    Zero blocks get 0. If ``min_k`` per block does not fit in ``total`` the sum exceeds it.
    """
    n = len(sizes)
    ks = [0] * n
    weight = [math.sqrt(s) * nrm for s, nrm in zip(sizes, norms, strict=True)]
    free = [i for i in range(n) if norms[i] > 0 and sizes[i] > 0]
    budget = float(total)
    while free:
        sw = sum(weight[i] for i in free)
        share = {i: budget * weight[i] / sw for i in free}
        dense = [i for i in free if share[i] >= sizes[i] or min(min_k, sizes[i]) >= sizes[i]]
        if dense:
            for i in dense:
                ks[i] = sizes[i]
                budget -= sizes[i]
            free = [i for i in free if i not in set(dense)]
            continue
        low = [i for i in free if share[i] < min_k]
        if low:
            for i in low:
                ks[i] = min_k
                budget -= min_k
            free = [i for i in free if i not in set(low)]
            continue
        floors = {i: math.floor(share[i]) for i in free}
        for i in free:
            ks[i] = floors[i]
        left = max(0, round(budget) - sum(floors.values()))
        order = sorted(free, key=lambda i: (-(share[i] - floors[i]), i))
        for i in order[:left]:
            ks[i] = min(sizes[i], ks[i] + 1)
        break
    return ks


@dataclasses.dataclass
class ProjectionCodec(Codec):
    """Options shared by the sketch codecs.

    k: total coefficients per client-round (None: ``default_k(d, compression)``).
    compression: d/K used when ``k`` is None (default 64, research note §5).
    coef_bits: 32 (fp32), 16 (fp16, block-relative), 8 (int8, stochastic rounding), 1 (sign).
    min_per_block: least coefficients for a non-zero block (Ferret uses 2).
    max_block: tensors above this many elements are split into equal blocks.
    unbiased: False makes the decoder shrink block l by ``1/(1+omega_l)`` (biased, MSE
    ``omega/(1+omega)·‖Δ‖² < ‖Δ‖²``, i.e. contractive: required for client-side
    :class:`~fedtune.codecs.ErrorFeedback`, which diverges with an unbiased ``d/K`` sketch).
    """

    k: int | None = None
    compression: float = 64.0
    coef_bits: int = 32
    min_per_block: int = 2
    max_block: int = 1 << 22
    unbiased: bool = True

    name: ClassVar[str] = ""
    _ROWS_BUDGET: ClassVar[int] = 1 << 22  # elements of basis generated at once

    def __post_init__(self) -> None:
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k must be a positive int or None, got {self.k!r}")
        if not self.compression > 1:
            raise ValueError(f"compression must be > 1, got {self.compression!r}")
        self._coef = q.coef_from_bits(self.coef_bits)
        if not isinstance(self.min_per_block, int) or self.min_per_block < 1:
            raise ValueError(f"min_per_block must be a positive int, got {self.min_per_block!r}")
        if not isinstance(self.max_block, int) or self.max_block < 2:
            raise ValueError(f"max_block must be an int >= 2, got {self.max_block!r}")

    # --- what a basis provides ---------------------------------------------------------------

    def project(self, x: torch.Tensor, k: int, key: int, block: int) -> torch.Tensor:
        """Coefficients ``y = A x`` (length k) of one block."""
        raise NotImplementedError

    def reconstruct(
        self, y: torch.Tensor, d: int, key: int, block: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The unbiased estimate ``c Aᵀ y`` (length d, fp32 CPU).

        A basis may write it into ``out`` (a contiguous fp32 CPU view of length d) and return
        ``out``, which saves the decoder a copy; returning a new tensor is also fine.
        """
        raise NotImplementedError

    def project_blocks(
        self, items: list[tuple[torch.Tensor, int, int]], key: int
    ) -> list[torch.Tensor]:
        """``project`` over (x, k, block) items; a basis may override it to batch blocks."""
        return [self.project(x, k, key, blk) for x, k, blk in items]

    def reconstruct_blocks(
        self,
        items: list[tuple[torch.Tensor, int, int]],
        key: int,
        outs: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """``reconstruct`` over (y, d, block) items; a basis may override it to batch blocks."""
        dests: list[torch.Tensor | None] = list(outs) if outs is not None else [None] * len(items)
        return [
            self.reconstruct(y, d, key, blk, out=o)
            for (y, d, blk), o in zip(items, dests, strict=True)
        ]

    def omega(self, d: int, k: int) -> float:
        """Exact ``E‖Δ̂−Δ‖² / ‖Δ‖²`` of the fp32 unbiased estimator for one block."""
        raise NotImplementedError

    def coef_std(self, d: int, k: int) -> float:
        """RMS of a coefficient divided by ‖x‖ (used to scale 1-bit coefficients)."""
        raise NotImplementedError

    def omega_coef(self, d: int, k: int, coef: int) -> float:
        """Variance factor including the coefficient quantizer (used by the shrink option).

        1-bit signs scaled by ``√(π/2)σ`` multiply the second moment by ~π/2 (exact for
        Gaussian bases: ``((π/2)d − 1)/K``); int8/fp16 add < 1e-3 and are ignored.
        """
        om = self.omega(d, k)
        return (math.pi / 2) * (1.0 + om) - 1.0 if coef == wire.COEF_SIGN1 else om

    # --- helpers ------------------------------------------------------------------------------

    def total_k(self, d: int) -> int:
        return min(d, self.k) if self.k is not None else default_k(d, self.compression)

    def allocate_blocks(self, blocks: list[Block], norms: list[float]) -> list[int]:
        """K_l per block (see :func:`allocate`)."""
        sizes = [b.size for b in blocks]
        return allocate(sizes, norms, self.total_k(sum(sizes)), self.min_per_block)

    def theory_mse(self, delta: Delta) -> float:
        """``Σ_l omega_l ‖Δ_l‖²`` for the allocation this codec would choose (fp32 coefs)."""
        flat = check_delta(delta)
        blocks = make_blocks(flat, self.max_block)
        xs = [flat[b.name][b.start : b.stop] for b in blocks]
        norms = [math.sqrt(sq_norm(x)) for x in xs]
        ks = self.allocate_blocks(blocks, norms)
        return sum(
            self.omega(b.size, kk) * nrm**2
            for b, kk, nrm in zip(blocks, ks, norms, strict=True)
            if 0 < kk < b.size
        )

    def max_payload_bytes(self, like: Delta) -> int:
        blocks = make_blocks(like, self.max_block)
        return wire.max_size(len(blocks), 4 * _total(blocks))

    # --- encode / decode ----------------------------------------------------------------------

    def encode(self, delta: Any, key: int, *, round: int = 0, slot: int = 0) -> bytes:
        check_ids(key, round, slot)
        flat = check_delta(delta, finite=False)  # the block norms below check finiteness
        blocks = make_blocks(flat, self.max_block)
        xs = [flat[b.name][b.start : b.stop] for b in blocks]
        norms = [math.sqrt(sq_norm(x)) for x in xs]
        for b, nrm in zip(blocks, norms, strict=True):
            if not math.isfinite(nrm):
                raise ValueError(f"delta[{b.name!r}] contains non-finite values")
        ks = self.allocate_blocks(blocks, norms)
        todo = [
            (x, kk, b.index) for b, x, kk in zip(blocks, xs, ks, strict=True) if 0 < kk < b.size
        ]
        projected = iter(self.project_blocks(todo, key))
        body: list[bytes] = []
        scales: list[float] = []
        for b, x, kk, nrm in zip(blocks, xs, ks, norms, strict=True):
            if kk == 0:
                scales.append(0.0)
                continue
            if kk == b.size:
                y = x
                sign_scale = float(x.abs().mean())
            else:
                y = next(projected)
                sign_scale = math.sqrt(math.pi / 2) * nrm * self.coef_std(b.size, kk)
            raw, scale = q.quantize(y, self._coef, key=key, stream=b.index, sign_scale=sign_scale)
            body.append(raw)
            scales.append(scale)
        flags = 0 if self.unbiased else wire.FLAG_SHRINK
        if self._coef != wire.COEF_FP32:
            flags |= wire.FLAG_SCALES
        if self._coef == wire.COEF_INT8:
            flags |= wire.FLAG_STOCHASTIC
        header = wire.Header(
            codec_id=wire.codec_id(self.name),
            coef=self._coef,
            flags=flags,
            round=round,
            slot=slot,
            key=key,
            layout=spec_hash(delta, self.layout_salt),
            ks=tuple(ks),
            scales=tuple(scales) if flags & wire.FLAG_SCALES else None,
        )
        return wire.pack(header, b"".join(body))

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
        blocks = make_blocks(like, self.max_block)
        h, body = wire.unpack(payload, self.max_payload_bytes(like))
        wire.check_header(
            h,
            codec=self.name,
            layout=spec_hash(like, self.layout_salt),
            n_blocks=len(blocks),
            key=key,
            round=round,
            slot=slot,
        )
        if h.coef == wire.COEF_FP32 and h.flags & wire.FLAG_SCALES:
            raise PayloadError("fp32 coefficients must not carry a scale table")
        if h.coef != wire.COEF_FP32 and not h.flags & wire.FLAG_SCALES:
            raise PayloadError(f"{wire.COEF_NAMES[h.coef]} coefficients need a scale table")
        for b, kk in zip(blocks, h.ks, strict=True):
            if kk > b.size:
                raise PayloadError(f"block {b.index} ({b.name}) has K={kk} > its size {b.size}")
        want = sum(q.nbytes(h.coef, kk) for kk in h.ks)
        if len(body) != want:
            raise PayloadError(f"body length {len(body)} does not match the K table ({want})")
        out = empty_like_spec(like, zero=False)  # every block is written below (zero ones too)
        flat_out = {n: t.view(-1) for n, t in out.items()}
        pos = 0
        coefs: list[torch.Tensor | None] = []
        for b, kk in zip(blocks, h.ks, strict=True):
            nb = q.nbytes(h.coef, kk)
            scale = h.scales[b.index] if h.scales is not None else 1.0
            coefs.append(q.dequantize(body[pos : pos + nb], kk, h.coef, scale) if kk else None)
            pos += nb
        sketched = [
            (b, y)
            for b, y, kk in zip(blocks, coefs, h.ks, strict=True)
            if y is not None and kk < b.size
        ]
        todo = [(y, b.size, b.index) for b, y in sketched]
        dests = [flat_out[b.name][b.start : b.stop] for b, _ in sketched]  # written in place
        rebuilt = iter(self.reconstruct_blocks(todo, h.key, dests))
        for b, y, kk in zip(blocks, coefs, h.ks, strict=True):
            dest = flat_out[b.name][b.start : b.stop]
            if y is None:
                dest.zero_()
                continue
            if kk == b.size:
                dest.copy_(y)
            else:
                xhat = next(rebuilt)
                if xhat.data_ptr() != dest.data_ptr():  # the basis did not write in place
                    dest.copy_(xhat)
                if h.flags & wire.FLAG_SHRINK:
                    dest.mul_(1.0 / (1.0 + self.omega_coef(b.size, kk, h.coef)))
            if not math.isfinite(sq_norm(dest)):
                raise PayloadError(f"block {b.index} ({b.name}) decodes to non-finite values")
        return out


def _total(blocks: list[Block]) -> int:
    return sum(b.size for b in blocks)
