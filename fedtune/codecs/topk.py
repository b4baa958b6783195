"""``topk``: top-k sparsification over the whole adapter, sent as (index, value) pairs.

The client keeps the ``k = max(1, round(density·d))`` coordinates of largest magnitude over
the WHOLE adapter (all tensors together, ``d`` coordinates) and sends them; the server
scatters them into zeros. Aji & Heafield, "Sparse Communication for Distributed Gradient
Descent" (EMNLP 2017); Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory" (NeurIPS 2018).
Top-k is biased but contractive (``‖x − C(x)‖² ≤ (1 − k/d)‖x‖²``), so it is the textbook
partner of client-side error feedback (:class:`~fedtune.codecs.ErrorFeedback`, Stich et al.):
what was not sent this round is resent later and nothing is lost over rounds.

Selection: the threshold is the exact k-th largest ``|x|`` (``torch.kthvalue``, never
``torch.quantile``); every coordinate above it is kept, and ties at the threshold are broken
by the lower global index. Zeros are never kept, so a delta with fewer than k non-zeros sends
only those (``Σ K_l <= k``). Decoding is an elementwise scatter of unique indices (no sums),
so it is bit-identical on every machine and thread count (``replayable``).

Payload (the shared wire format, :mod:`fedtune.codecs.wire`, codec id 7). Blocks are the
adapter's tensors (a tensor above 2**32 elements is split so that local indices fit in u32);
the K table holds ``K_l``, the number of entries kept in block l. Body::

    values    K = Σ K_l values in block order, indices ascending within a block:
              fp32 (value_bits=32, no scale table) or fp16 relative to the block's
              max |value| (value_bits=16, FLAG_SCALES, scale_l = that max; 0 for empty blocks)
    indices   per block with K_l > 0: the K_l local indices (ascending, unique, < d_l),
              bit-packed little-endian at w_l = bit_length(d_l − 1) bits each,
              padded with zero bits to a whole byte

So a kept entry costs ``value_bits/8 + w_l/8`` bytes: for a LoRA factor of 16·4096 = 65536
elements w_l = 16, i.e. 6 bytes (fp32) or 4 bytes (fp16) per entry, against 8 / 6 with
u32 indices. Fixed overhead: the 40-byte header, 4 bytes per block for the K table (+4 for
the fp16 scale table), under one byte of padding per non-empty block and the 4-byte CRC.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
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
)
from fedtune.codecs.registry import register

_MAX_BLOCK = 1 << 32  # local indices fit in u32
_CHUNK = 1 << 20  # indices packed at once (a multiple of 8: chunks stay byte-aligned)


def index_width(size: int) -> int:
    """Bits per index in a block of ``size`` elements: ``bit_length(size − 1)`` (0 for 1)."""
    return (size - 1).bit_length()


def index_bytes(k: int, size: int) -> int:
    """Bytes that ``k`` bit-packed indices of a block of ``size`` elements take."""
    return (k * index_width(size) + 7) // 8


def pack_indices(idx: np.ndarray, width: int) -> bytes:
    """Little-endian bit-packing of non-negative ints ``< 2**width`` (``width <= 32``)."""
    if width == 0 or idx.size == 0:
        return b""
    parts = []
    for s in range(0, idx.size, _CHUNK):
        words = np.ascontiguousarray(idx[s : s + _CHUNK], dtype="<u4").view(np.uint8)
        bits = np.unpackbits(words.reshape(-1, 4), axis=1, bitorder="little")[:, :width]
        parts.append(np.packbits(bits.reshape(-1), bitorder="little").tobytes())
    return b"".join(parts)


def unpack_indices(buf: memoryview | bytes, k: int, width: int) -> tuple[np.ndarray, bool]:
    """Inverse of :func:`pack_indices`: (int64 indices, whether the padding bits are zero)."""
    if width == 0:
        return np.zeros(k, dtype=np.int64), True
    raw = np.frombuffer(buf, dtype=np.uint8)
    out = np.empty(k, dtype=np.int64)
    step = _CHUNK * width // 8
    for c, s in enumerate(range(0, k, _CHUNK)):
        n = min(_CHUNK, k - s)
        bits = np.unpackbits(raw[c * step : c * step + (n * width + 7) // 8], bitorder="little")
        words = np.zeros((n, 32), dtype=np.uint8)
        words[:, :width] = bits[: n * width].reshape(n, width)
        out[s : s + n] = np.packbits(words, axis=1, bitorder="little").view("<u4").reshape(n)
    tail = np.unpackbits(raw[-1:], bitorder="little")[(k * width) % 8 or 8 :]
    return out, not tail.any()


@register("topk")
@dataclasses.dataclass
class TopKCodec(Codec):
    """Options: ``density`` in (0, 1] (fraction of the adapter's coordinates kept, by
    magnitude over all tensors together), ``value_bits`` in {32, 16} (fp32 or block-relative
    fp16 values)."""

    density: float = 0.01
    value_bits: int = 32

    name: ClassVar[str] = "topk"
    replayable: ClassVar[bool] = True  # decoding is an elementwise scatter
    zeroth_order: ClassVar[bool] = False

    def __post_init__(self) -> None:
        d = self.density
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d <= 1:
            raise ValueError(f"density must be a float in (0, 1], got {d!r}")
        if self.value_bits not in (32, 16):
            raise ValueError(f"value_bits must be 32 or 16, got {self.value_bits!r}")
        self._coef = q.coef_from_bits(self.value_bits)

    def k_of(self, d: int) -> int:
        """Entries kept of ``d`` coordinates: ``max(1, round(density·d))`` (at most d)."""
        return min(d, max(1, round(self.density * d)))

    def _value_bytes(self) -> int:
        return self.value_bits // 8

    def max_payload_bytes(self, like: Delta) -> int:
        blocks = make_blocks(like, _MAX_BLOCK)
        k = self.k_of(sum(b.size for b in blocks))
        w = max(index_width(b.size) for b in blocks)
        body = self._value_bytes() * k + (k * w + 7) // 8 + len(blocks)
        return wire.max_size(len(blocks), body)

    def payload_bytes(self, like: Delta, ks: list[int]) -> int:
        """Exact size of a payload that keeps ``ks[l]`` entries in block l of ``like``."""
        blocks = make_blocks(like, _MAX_BLOCK)
        flags = wire.FLAG_SCALES if self._coef == wire.COEF_FP16 else 0
        idx = sum(index_bytes(kk, b.size) for b, kk in zip(blocks, ks, strict=True))
        return (
            wire.FIXED_SIZE
            + wire.table_size(len(blocks), flags)
            + self._value_bytes() * sum(ks)
            + idx
            + wire.CRC_SIZE
        )

    # --- encode -------------------------------------------------------------------------------

    def select(self, a: torch.Tensor) -> torch.Tensor:
        """Sorted global indices (int64, a's device) of the kept entries, given the flat
        magnitudes ``a = |x|``: the k largest, ties at the threshold by lower index, no zeros."""
        d = a.numel()
        k = self.k_of(d)
        if k >= d:
            return torch.nonzero(a > 0).view(-1)
        t = torch.kthvalue(a, d - k + 1).values  # the k-th largest |x| (exact, any d)
        if float(t) == 0:
            return torch.nonzero(a > 0).view(-1)  # fewer than k non-zeros: send those
        keep = a >= t
        extra = int(keep.sum()) - k
        if extra > 0:  # ties at the threshold: keep the lowest indices
            ties = torch.nonzero(a == t).view(-1)
            keep[ties[len(ties) - extra :]] = False
        return torch.nonzero(keep).view(-1)

    def encode(self, delta: Any, key: int, *, round: int = 0, slot: int = 0) -> bytes:
        check_ids(key, round, slot)
        flat = check_delta(delta)
        blocks = make_blocks(flat, _MAX_BLOCK)
        x = torch.cat([flat[n] for n in flat])
        gidx = self.select(x.abs())
        vals = x[gidx].cpu()
        del x
        gidx_np = gidx.cpu().numpy()
        starts = np.cumsum([0] + [b.size for b in blocks])
        cuts = np.searchsorted(gidx_np, starts)
        ks: list[int] = []
        scales: list[float] = []
        values: list[bytes] = []
        indices: list[bytes] = []
        for b in blocks:
            lo, hi = int(cuts[b.index]), int(cuts[b.index + 1])
            ks.append(hi - lo)
            if hi == lo:
                scales.append(0.0)
                continue
            raw, scale = q.quantize(vals[lo:hi], self._coef, key=key, stream=b.index)
            values.append(raw)
            scales.append(scale)
            local = gidx_np[lo:hi] - starts[b.index]
            indices.append(pack_indices(local, index_width(b.size)))
        flags = wire.FLAG_SCALES if self._coef == wire.COEF_FP16 else 0
        header = wire.Header(
            codec_id=wire.codec_id(self.name),
            coef=self._coef,
            flags=flags,
            round=round,
            slot=slot,
            key=key,
            layout=spec_hash(delta, self.layout_salt),
            ks=tuple(ks),
            scales=tuple(scales) if flags else None,
        )
        return wire.pack(header, b"".join(values + indices))

    # --- decode -------------------------------------------------------------------------------

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
        blocks = make_blocks(like, _MAX_BLOCK)
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
        if h.coef not in (wire.COEF_FP32, wire.COEF_FP16):
            raise PayloadError(f"topk values must be fp32 or fp16, got {wire.COEF_NAMES[h.coef]}")
        want_flags = wire.FLAG_SCALES if h.coef == wire.COEF_FP16 else 0
        if h.flags != want_flags:
            raise PayloadError(
                f"topk {wire.COEF_NAMES[h.coef]} payloads carry flags {want_flags:#x}, "
                f"got {h.flags:#x}"
            )
        k = self.k_of(sum(b.size for b in blocks))
        for b, kk in zip(blocks, h.ks, strict=True):
            if kk > b.size:
                raise PayloadError(
                    f"wrong count: block {b.index} ({b.name}) has K={kk} > its size {b.size}"
                )
        total = sum(h.ks)
        if total > k:
            raise PayloadError(
                f"wrong count: payload holds {total} entries, density={self.density} keeps "
                f"at most k={k}"
            )
        vb = q.nbytes(h.coef, total)
        want = vb + sum(index_bytes(kk, b.size) for b, kk in zip(blocks, h.ks, strict=True))
        if len(body) != want:
            raise PayloadError(f"body length {len(body)} does not match the K table ({want})")
        vals = self._values(body[:vb], h, blocks)
        out = empty_like_spec(like)
        flat_out = {n: t.view(-1) for n, t in out.items()}
        pos, vpos = vb, 0
        for b, kk in zip(blocks, h.ks, strict=True):
            if kk == 0:
                continue
            nb = index_bytes(kk, b.size)
            idx = _check_indices(body[pos : pos + nb], kk, b)
            pos += nb
            dest = flat_out[b.name][b.start : b.stop]
            dest[torch.from_numpy(idx)] = vals[vpos : vpos + kk]
            vpos += kk
        return out

    def _values(self, buf: memoryview, h: wire.Header, blocks: list[Block]) -> torch.Tensor:
        """The K values as fp32 (fp16 ones times their block's scale), checked finite."""
        if h.coef == wire.COEF_FP32:
            arr = np.frombuffer(buf, dtype="<f4").astype(np.float32)
        else:
            assert h.scales is not None  # wire.unpack: FLAG_SCALES is set
            per = np.repeat(np.asarray(h.scales, dtype=np.float32), h.ks)
            with np.errstate(over="ignore", invalid="ignore"):
                arr = np.frombuffer(buf, dtype="<f2").astype(np.float32) * per
        bad = ~np.isfinite(arr)
        if bad.any():
            first = int(np.argmax(bad))
            b = blocks[int(np.searchsorted(np.cumsum(h.ks), first, side="right"))]
            raise PayloadError(f"non-finite value in block {b.index} ({b.name})")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _check_indices(buf: memoryview, k: int, b: Block) -> np.ndarray:
    idx, clean = unpack_indices(buf, k, index_width(b.size))
    if not clean:
        raise PayloadError(f"block {b.index} ({b.name}): non-zero padding bits after the indices")
    if k and int(idx.max()) >= b.size:
        raise PayloadError(
            f"index out of range in block {b.index} ({b.name}): {int(idx.max())} >= {b.size}"
        )
    if k > 1 and not bool((np.diff(idx) > 0).all()):
        raise PayloadError(f"unsorted or duplicate indices in block {b.index} ({b.name})")
    return idx
