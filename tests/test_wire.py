"""Wire format: round trips, every validation error, and fuzzing (always PayloadError)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune import codecs
from fedtune.codecs import wire
from fedtune.codecs.base import Codec
from fedtune.zo import round_scalar

KEY, ROUND, SLOT = 0x1234_5678_9ABC_DEF0, 7, 3


def spec() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.lora_A": torch.randn(4, 24, generator=g),
        "a.lora_B": torch.randn(30, 4, generator=g),
    }


CASES: list[tuple[str, dict[str, object]]] = [("dense", {"coef_bits": b}) for b in (32, 16, 8)] + [
    (n, {"k": 24, "coef_bits": b, "unbiased": u})
    for n in ("gaussian", "rademacher", "srht", "countsketch")
    for b in (32, 16, 8, 1)
    for u in (True, False)
]
SPSA_CASES = [("spsa", {"lr": 1e-3, "coef_bits": b}) for b in (32, 16)]


def encode(
    name: str, opts: dict[str, object], like: dict[str, torch.Tensor]
) -> tuple[Codec, bytes]:
    codec = codecs.get(name, **opts)
    if name == "spsa":
        bits = int(opts["coef_bits"])  # type: ignore[call-overload]
        scalars = [round_scalar(v, bits) for v in (0.5, -1.25, 3.0, 1e-3)]
        return codec, codec.encode(codecs.ZOUpdate(scalars, like), KEY, round=ROUND, slot=SLOT)
    return codec, codec.encode(like, KEY, round=ROUND, slot=SLOT)


def refresh_crc(p: bytes | bytearray) -> bytes:
    body = bytes(p[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(("name", "opts"), CASES + SPSA_CASES)
def test_round_trip_every_codec_and_dtype(name: str, opts: dict[str, object]) -> None:
    like = spec()
    codec, p = encode(name, opts, like)
    out = codec.decode(p, like=like, key=KEY, round=ROUND, slot=SLOT)
    assert list(out) == list(like)
    for n in like:
        assert out[n].shape == like[n].shape and out[n].dtype == torch.float32
        assert bool(torch.isfinite(out[n]).all())
    h, _ = wire.unpack(p, 10**7)
    assert (h.round, h.slot, h.key) == (ROUND, SLOT, KEY)
    assert h.codec_id == wire.CODEC_IDS[name]
    assert len(p) <= codec.max_payload_bytes(like)
    # decoding without expectations uses the header's key
    out2 = codec.decode(p, like=like)
    for n in like:
        assert torch.equal(out[n], out2[n])


def test_payload_sizes() -> None:
    like = spec()
    d = sum(t.numel() for t in like.values())
    fixed = wire.FIXED_SIZE + wire.CRC_SIZE
    assert len(codecs.get("dense").encode(like, KEY)) == fixed + 2 * 4 + 4 * d
    assert len(codecs.get("srht", k=24).encode(like, KEY)) == fixed + 2 * 4 + 4 * 24
    assert len(codecs.get("srht", k=24, coef_bits=8).encode(like, KEY)) == fixed + 2 * 8 + 24
    # 1 bit per coefficient, padded to whole bytes per block
    p = codecs.get("countsketch", k=24, coef_bits=1).encode(like, KEY)
    h, _ = wire.unpack(p, 10**6)
    assert len(p) == fixed + 2 * 8 + sum((k + 7) // 8 for k in h.ks)


@pytest.mark.parametrize(
    ("field", "kwargs", "match"),
    [
        ("round", {"round": ROUND + 1}, "round mismatch"),
        ("slot", {"slot": SLOT + 1}, "slot mismatch"),
        ("key", {"key": KEY + 1}, "key mismatch"),
    ],
)
def test_expectation_mismatch(field: str, kwargs: dict[str, int], match: str) -> None:
    like = spec()
    codec, p = encode("srht", {"k": 24}, like)
    expect = {"key": KEY, "round": ROUND, "slot": SLOT, **kwargs}
    with pytest.raises(codecs.PayloadError, match=match):
        codec.decode(p, like=like, **expect)


def test_layout_and_codec_mismatch() -> None:
    like = spec()
    codec, p = encode("srht", {"k": 24}, like)
    other = {"a.lora_A": torch.zeros(4, 24), "a.lora_B": torch.zeros(31, 4)}
    with pytest.raises(codecs.PayloadError, match="layout hash mismatch"):
        codec.decode(p, like=other)
    renamed = {"x": like["a.lora_A"], "a.lora_B": like["a.lora_B"]}
    with pytest.raises(codecs.PayloadError, match="layout hash mismatch"):
        codec.decode(p, like=renamed)
    with pytest.raises(codecs.PayloadError, match=r"codec mismatch.*'srht'.*'countsketch'"):
        codecs.get("countsketch", k=24).decode(p, like=like)
    with pytest.raises(codecs.PayloadError, match="codec mismatch"):
        codecs.get("spsa", lr=0.1).decode(p, like=like)
    _, sp = encode("spsa", {"lr": 1e-3, "coef_bits": 32}, like)
    with pytest.raises(codecs.PayloadError, match="lr mismatch"):
        codecs.get("spsa", lr=2e-3).decode(sp, like=like)


def test_framing_errors() -> None:
    like = spec()
    codec, p = encode("countsketch", {"k": 24, "coef_bits": 8}, like)
    with pytest.raises(codecs.PayloadError, match="truncated"):
        codec.decode(p[:20], like=like)
    with pytest.raises(codecs.PayloadError, match="oversized"):
        codec.decode(p + bytes(codec.max_payload_bytes(like)), like=like)
    with pytest.raises(codecs.PayloadError, match="bad magic"):
        codec.decode(b"XXXX" + p[4:], like=like)
    bad = bytearray(p)
    bad[4] = 9
    with pytest.raises(codecs.PayloadError, match="unknown version 9"):
        codec.decode(bytes(bad), like=like)
    bad = bytearray(p)
    bad[60] ^= 0x10
    with pytest.raises(codecs.PayloadError, match="CRC mismatch"):
        codec.decode(bytes(bad), like=like)
    with pytest.raises(codecs.PayloadError, match="CRC mismatch"):
        codec.decode(p[:-7] + p[-4:], like=like)
    with pytest.raises(codecs.PayloadError, match="must be bytes"):
        codec.decode("text", like=like)  # type: ignore[arg-type]


def test_crafted_errors_with_valid_crc() -> None:
    """Fields that pass the CRC but are wrong (a buggy or malicious encoder)."""
    like = spec()
    codec, p = encode("srht", {"k": 24, "coef_bits": 32}, like)

    def patch(offset: int, fmt: str, value: object, src: bytes = p) -> bytes:
        b = bytearray(src)
        struct.pack_into(fmt, b, offset, value)
        return refresh_crc(b)

    with pytest.raises(codecs.PayloadError, match="unknown codec id 77"):
        codec.decode(patch(5, "<B", 77), like=like)
    with pytest.raises(codecs.PayloadError, match="unknown coefficient dtype id 9"):
        codec.decode(patch(6, "<B", 9), like=like)
    with pytest.raises(codecs.PayloadError, match="unknown flag bits 0x80"):
        codec.decode(patch(7, "<B", 0x80), like=like)
    with pytest.raises(codecs.PayloadError, match=r"need a scale table|length mismatch"):
        codec.decode(patch(6, "<B", wire.COEF_FP16), like=like)
    with pytest.raises(codecs.PayloadError, match="length mismatch"):
        codec.decode(patch(32, "<I", 3), like=like)  # n_blocks
    with pytest.raises(codecs.PayloadError, match="length mismatch"):
        codec.decode(patch(36, "<I", 1), like=like)  # body length
    h, _ = wire.unpack(p, 10**6)
    with pytest.raises(codecs.PayloadError, match=r"K=500 > its size 96"):
        codec.decode(patch(40, "<I", 500), like=like)
    # moving coefficients between blocks keeps the total but not the per-block sums
    with pytest.raises(codecs.PayloadError, match="body length"):
        codec.decode(patch(40, "<I", h.ks[0] + 1), like=like)
    start = wire.FIXED_SIZE + 4 * len(h.ks)
    with pytest.raises(codecs.PayloadError, match="non-finite coefficient"):
        codec.decode(patch(start, "<f", float("nan")), like=like)
    with pytest.raises(codecs.PayloadError, match="non-finite"):
        codec.decode(patch(start, "<f", float("inf")), like=like)
    # a huge finite coefficient that overflows on reconstruction
    big = patch(start + 4, "<f", 3e38, patch(start, "<f", 3e38))
    with pytest.raises(codecs.PayloadError, match="decodes to non-finite"):
        codec.decode(big, like=like)
    # int8 payloads: scale table and the -128 code
    c8, p8 = encode("srht", {"k": 24, "coef_bits": 8}, like)
    scales_at = wire.FIXED_SIZE + 4 * len(h.ks)
    with pytest.raises(codecs.PayloadError, match="non-finite or negative block scale"):
        c8.decode(patch(scales_at, "<f", float("nan"), p8), like=like)
    with pytest.raises(codecs.PayloadError, match="non-finite or negative block scale"):
        c8.decode(patch(scales_at, "<f", -1.0, p8), like=like)
    with pytest.raises(codecs.PayloadError, match="-128"):
        c8.decode(patch(scales_at + 8, "<b", -128, p8), like=like)
    # spsa: non-finite lr / scalar
    cs, ps = encode("spsa", {"lr": 1e-3, "coef_bits": 32}, like)
    body = wire.FIXED_SIZE + 4
    with pytest.raises(codecs.PayloadError, match="non-finite lr"):
        cs.decode(patch(body, "<d", float("nan"), ps), like=like)
    with pytest.raises(codecs.PayloadError, match="non-finite scalar"):
        cs.decode(patch(body + 8, "<f", float("inf"), ps), like=like)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(CASES + SPSA_CASES),
    kind=st.sampled_from(["flip", "truncate", "append", "flip-fixcrc", "bytes-fixcrc"]),
    data=st.data(),
)
def test_corruption_never_decodes_silently(
    case: tuple[str, dict[str, object]], kind: str, data: st.DataObject
) -> None:
    """Random corruption raises PayloadError (never another exception, never silent success).

    With the CRC fixed up after corrupting (an adversarial encoder), decoding may succeed, but
    then only with finite output of the right shapes, or it raises PayloadError.
    """
    name, opts = case
    like = spec()
    codec, p = encode(name, opts, like)
    b = bytearray(p)
    if kind in ("flip", "flip-fixcrc"):
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    elif kind == "append":
        b += data.draw(st.binary(min_size=1, max_size=64))
    else:
        i = data.draw(st.integers(0, len(b) - 5))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        b[i : i + len(chunk)] = chunk
        b = b[: len(p)]
    if kind.endswith("fixcrc"):
        b = bytearray(refresh_crc(b))
        if bytes(b) == p:
            return
        try:
            out = codec.decode(bytes(b), like=like)
        except codecs.PayloadError:
            return
        for n in like:
            assert out[n].shape == like[n].shape and bool(torch.isfinite(out[n]).all())
        return
    if bytes(b) == p:
        return
    with pytest.raises(codecs.PayloadError):
        codec.decode(bytes(b), like=like, key=KEY, round=ROUND, slot=SLOT)


def test_pack_validates() -> None:
    h = wire.Header(wire.CODEC_IDS["dense"], wire.COEF_FP32, 0, 1 << 32, 0, 0, 0, (1,), None)
    with pytest.raises(ValueError, match="round"):
        wire.pack(h, b"\0\0\0\0")
    h = wire.Header(
        wire.CODEC_IDS["dense"], wire.COEF_FP16, wire.FLAG_SCALES, 0, 0, 0, 0, (1,), None
    )
    with pytest.raises(ValueError, match="scales"):
        wire.pack(h, b"\0\0")
    assert np.dtype("<u4").itemsize == 4


def test_user_codec_gets_a_wire_id() -> None:
    import dataclasses

    from fedtune.codecs.countsketch import CountSketchCodec

    @codecs.register("test-wire-user-sketch")
    @dataclasses.dataclass
    class UserSketch(CountSketchCodec):
        name = "test-wire-user-sketch"

    wire.register_codec_id("test-wire-user-sketch", 200)
    with pytest.raises(ValueError, match="already taken"):
        wire.register_codec_id("other", 200)
    with pytest.raises(ValueError, match=r"\[128, 255\]"):
        wire.register_codec_id("other", 5)
    like = spec()
    c = codecs.get("test-wire-user-sketch", k=24)
    p = c.encode(like, KEY)
    assert wire.unpack(p, 10**6)[0].codec_id == 200
    assert c.decode(p, like=like)["a.lora_A"].shape == (4, 24)
    with pytest.raises(codecs.PayloadError, match="codec mismatch"):
        codecs.get("countsketch", k=24).decode(p, like=like)
