"""Versioned little-endian payload format shared by every codec.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"FTUP"
    4       1     version (1)
    5       1     codec id        (see CODEC_IDS)
    6       1     coefficient dtype (COEF_*)
    7       1     flags           (FLAG_*; unknown bits are rejected)
    8       4     round           u32
    12      4     client slot     u32
    16      8     key             u64 (the key the server issued; bases are regenerated from it)
    24      8     layout hash     u64 (fedtune.layout.layout_hash of the adapter state)
    32      4     n_blocks        u32
    36      4     body length     u32 (bytes)
    40      4*n   K_l             u32 per block (K_l == d_l: block sent dense; 0: block is zero)
    ..      4*n   scale_l         f32 per block, present iff FLAG_SCALES
    ..      body  coefficients (codec-defined, see each codec)
    end-4   4     CRC32 (zlib.crc32) of every byte before it

Decoding never trusts a field before the ones it depends on are checked: size bounds,
magic, version, then the CRC over the whole payload, then codec, dtype, flags, the expected
round/slot/key/layout, the block table and the body length. Every failure is a
:class:`PayloadError` whose message names the field.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np

from fedtune.codecs.base import PayloadError

MAGIC = b"FTUP"
VERSION = 1

#: Stable ids of the built-in codecs (ids >= 128 are free for user codecs).
CODEC_IDS: dict[str, int] = {
    "dense": 1,
    "gaussian": 2,
    "rademacher": 3,
    "srht": 4,
    "countsketch": 5,
    "spsa": 6,
    "topk": 7,
}


def register_codec_id(name: str, codec_id: int) -> None:
    """Give a user codec (registered with ``codecs.register``) a wire id in [128, 255]."""
    if not 128 <= codec_id <= 255:
        raise ValueError(f"user codec ids must be in [128, 255], got {codec_id}")
    taken = {v: k for k, v in CODEC_IDS.items()}
    if taken.get(codec_id, name) != name or CODEC_IDS.get(name, codec_id) != codec_id:
        raise ValueError(f"codec id {codec_id} or name {name!r} is already taken")
    CODEC_IDS[name] = codec_id


def codec_id(name: str) -> int:
    """The wire id of codec ``name`` (built in, or given with :func:`register_codec_id`)."""
    try:
        return CODEC_IDS[name]
    except KeyError:
        raise ValueError(
            f"codec {name!r} has no wire id; call fedtune.codecs.wire.register_codec_id"
        ) from None


COEF_FP32 = 0
COEF_FP16 = 1
COEF_INT8 = 3  # linear, per-block scale, stochastic rounding
COEF_SIGN1 = 6  # 1 bit sign, per-block magnitude
COEF_NAMES = {COEF_FP32: "fp32", COEF_FP16: "fp16", COEF_INT8: "int8", COEF_SIGN1: "sign1"}

FLAG_STOCHASTIC = 1  # int8 coefficients were stochastically rounded (unbiased)
FLAG_SHRINK = 2  # decoder scales each block by 1/(1+omega_l): biased, lower MSE (for EF)
FLAG_SCALES = 4  # the per-block f32 scale table is present
KNOWN_FLAGS = FLAG_STOCHASTIC | FLAG_SHRINK | FLAG_SCALES

_FIXED = struct.Struct("<4sBBBBIIQQII")
FIXED_SIZE = _FIXED.size  # 40
CRC_SIZE = 4
U32_MAX = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class Header:
    """The decoded header fields of a payload."""

    codec_id: int
    coef: int
    flags: int
    round: int
    slot: int
    key: int
    layout: int
    ks: tuple[int, ...]
    scales: tuple[float, ...] | None


def table_size(n_blocks: int, flags: int) -> int:
    """Bytes of the K_l (and scale) tables for ``n_blocks`` blocks."""
    return 4 * n_blocks * (2 if flags & FLAG_SCALES else 1)


def max_size(n_blocks: int, max_body: int) -> int:
    """Upper bound on a valid payload's size: header, both tables, the body, the CRC."""
    return FIXED_SIZE + 8 * n_blocks + max_body + CRC_SIZE


def pack(h: Header, body: bytes) -> bytes:
    """Serialise a header and body and append the CRC32."""
    n = len(h.ks)
    if (h.scales is not None) != bool(h.flags & FLAG_SCALES):
        raise ValueError("scales must be given exactly when FLAG_SCALES is set")
    for name, v in (("round", h.round), ("slot", h.slot)):
        if not 0 <= v <= U32_MAX:
            raise ValueError(f"{name} must be in [0, 2**32), got {v}")
    if not 0 <= h.key < 1 << 64:
        raise ValueError(f"key must be in [0, 2**64), got {h.key}")
    if len(body) > U32_MAX or n > U32_MAX:
        raise ValueError("payload too large for the wire format")
    parts = [
        _FIXED.pack(
            MAGIC,
            VERSION,
            h.codec_id,
            h.coef,
            h.flags,
            h.round,
            h.slot,
            h.key,
            h.layout,
            n,
            len(body),
        ),
        np.asarray(h.ks, dtype="<u4").tobytes(),
    ]
    if h.scales is not None:
        parts.append(np.asarray(h.scales, dtype="<f4").tobytes())
    parts.append(body)
    data = b"".join(parts)
    return data + struct.pack("<I", zlib.crc32(data))


def unpack(payload: bytes | bytearray | memoryview, max_bytes: int) -> tuple[Header, memoryview]:
    """Check the framing (size, magic, version, CRC, table and body lengths) and split it."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
    data = memoryview(payload).cast("B")
    if len(data) < FIXED_SIZE + CRC_SIZE:
        raise PayloadError(
            f"payload truncated: {len(data)} bytes, a header alone is {FIXED_SIZE + CRC_SIZE}"
        )
    if len(data) > max_bytes:
        raise PayloadError(
            f"payload oversized: {len(data)} bytes exceeds the bound {max_bytes} for this layout"
        )
    magic, version, codec_id, coef, flags, rnd, slot, key, layout, n, body_len = _FIXED.unpack(
        data[:FIXED_SIZE]
    )
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise PayloadError(f"unknown version {version}, this decoder reads version {VERSION}")
    (crc,) = struct.unpack("<I", data[-CRC_SIZE:])
    if zlib.crc32(data[:-CRC_SIZE]) != crc:
        raise PayloadError("CRC mismatch: payload corrupted in transit")
    if flags & ~KNOWN_FLAGS:
        raise PayloadError(f"unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
    if coef not in COEF_NAMES:
        raise PayloadError(f"unknown coefficient dtype id {coef}")
    tsize = table_size(n, flags)
    if FIXED_SIZE + tsize + body_len + CRC_SIZE != len(data):
        raise PayloadError(
            f"length mismatch: header says {n} blocks and a {body_len}-byte body "
            f"({FIXED_SIZE + tsize + body_len + CRC_SIZE} bytes), payload has {len(data)}"
        )
    ks = tuple(int(v) for v in np.frombuffer(data, dtype="<u4", count=n, offset=FIXED_SIZE))
    scales = None
    if flags & FLAG_SCALES:
        arr = np.frombuffer(data, dtype="<f4", count=n, offset=FIXED_SIZE + 4 * n)
        if not np.isfinite(arr).all() or (arr < 0).any():
            raise PayloadError("non-finite or negative block scale")
        scales = tuple(float(v) for v in arr)
    start = FIXED_SIZE + tsize
    h = Header(codec_id, coef, flags, rnd, slot, key, layout, ks, scales)
    return h, data[start : start + body_len]


def check_header(
    h: Header,
    *,
    codec: str,
    layout: int,
    n_blocks: int,
    key: int | None,
    round: int | None,
    slot: int | None,
) -> None:
    """Compare the header with what the decoder expects; each mismatch names its field."""
    want = codec_id(codec)
    if h.codec_id != want:
        known = {v: k for k, v in CODEC_IDS.items()}
        if h.codec_id not in known:
            raise PayloadError(f"unknown codec id {h.codec_id}")
        raise PayloadError(
            f"codec mismatch: payload was encoded with {known[h.codec_id]!r}, decoder is {codec!r}"
        )
    if h.layout != layout:
        raise PayloadError(
            f"layout hash mismatch: payload {h.layout:#018x}, expected {layout:#018x} "
            "(different adapter tensors, shapes or dtypes, or MoS index lists)"
        )
    if round is not None and h.round != round:
        raise PayloadError(f"round mismatch: payload is for round {h.round}, expected {round}")
    if slot is not None and h.slot != slot:
        raise PayloadError(f"slot mismatch: payload is from client slot {h.slot}, expected {slot}")
    if key is not None and h.key != key:
        raise PayloadError("key mismatch: payload was not encoded with the key issued to it")
    if len(h.ks) != n_blocks:
        raise PayloadError(f"block count mismatch: payload has {len(h.ks)}, layout has {n_blocks}")
