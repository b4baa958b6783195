"""topk codec: exact top-k selection, lossless at density 1, error feedback loses nothing,
every malformed payload rejected by name, payload size formula; codec self-declarations."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune import codecs, rng
from fedtune.codecs import topk, wire
from fedtune.codecs.base import spec_hash
from fedtune.codecs.topk import TopKCodec, index_width, pack_indices
from fedtune.registry import RegistryError

KEY, ROUND, SLOT = 0x0DDC_0FFE_E123_4567, 5, 2


def lora_like(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # test data only; library code uses fedtune.rng
    return {
        "l0.lora_A": torch.randn(4, 24, generator=g),
        "l0.lora_B": torch.randn(30, 4, generator=g) * 0.3,  # 120: not a power of two
        "head.bias": torch.randn(5, generator=g) * 2,
    }


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float32) for t in d.values()])


def reference_topk(x: torch.Tensor, k: int) -> list[int]:
    """The documented rule, by brute force: largest |x| first, ties by lower index, no zeros."""
    order = sorted(range(x.numel()), key=lambda i: (-abs(float(x[i])), i))
    return sorted(i for i in order[:k] if float(x[i]) != 0.0)


def get(density: float, value_bits: int = 32) -> TopKCodec:
    c = codecs.get("topk", density=density, value_bits=value_bits)
    assert isinstance(c, TopKCodec)
    return c


def roundtrip(c: TopKCodec, like: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, torch.Tensor]]:
    p = c.encode(like, KEY, round=ROUND, slot=SLOT)
    return p, c.decode(p, like=like, key=KEY, round=ROUND, slot=SLOT)


# --- selection ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 17), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    density=st.floats(1e-3, 1.0),
    value_bits=st.sampled_from([32, 16]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_keeps_exactly_the_top_k(
    shapes: list[tuple[int, ...]], density: float, value_bits: int, ties: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    like = {}
    for i, s in enumerate(shapes):
        t = torch.randn(*s, generator=g)
        if ties:  # few distinct magnitudes and some zeros: ties at the threshold, zeros skipped
            t = torch.randint(-3, 4, s, generator=g).to(torch.float32)
        like[f"t{i}"] = t
    c = get(density, value_bits)
    x = flat(like)
    d = x.numel()
    k = c.k_of(d)
    assert k == min(d, max(1, round(density * d)))
    _, out = roundtrip(c, like)
    assert list(out) == list(like)
    assert all(out[n].shape == like[n].shape and out[n].dtype == torch.float32 for n in like)
    y = flat(out)
    want = reference_topk(x, k)
    assert torch.nonzero(y).view(-1).tolist() == [i for i in want if float(y[i]) != 0.0]
    kept = torch.zeros(d, dtype=torch.bool)
    kept[want] = True
    assert bool((y[~kept] == 0).all())
    if value_bits == 32:
        assert torch.equal(y[kept], x[kept])
    elif kept.any():  # fp16 relative to the tensor's max kept |value|
        tol = float(x[kept].abs().max()) * 2**-11
        assert float((y[kept] - x[kept]).abs().max()) <= tol


def test_ties_are_broken_by_lower_index_over_the_whole_adapter() -> None:
    like = {"a": torch.tensor([1.0, -2.0, 2.0]), "b": torch.tensor([-2.0, 2.0, 0.5])}
    _, out = roundtrip(get(3 / 6), like)
    assert out["a"].tolist() == [0.0, -2.0, 2.0] and out["b"].tolist() == [-2.0, 0.0, 0.0]


def test_zeros_are_never_sent() -> None:
    like = {"a": torch.zeros(50), "b": torch.zeros(3, 4)}
    like["a"][[3, 40]] = torch.tensor([1.5, -0.25])
    c = get(0.5)
    p, out = roundtrip(c, like)
    h, _ = wire.unpack(p, 10**6)
    assert h.ks == (2, 0)
    assert torch.equal(out["a"], like["a"]) and torch.equal(out["b"], like["b"])
    assert len(p) == c.payload_bytes(like, [2, 0])
    p, out = roundtrip(c, {"a": torch.zeros(50), "b": torch.zeros(3, 4)})  # zero delta
    assert wire.unpack(p, 10**6)[0].ks == (0, 0) and all(not t.any() for t in out.values())


def test_density_one_is_lossless_and_bit_exact() -> None:
    like = lora_like(3)
    like["head.bias"][1] = 0.0
    like["l0.lora_A"][0, :5] = torch.tensor([1e-30, -1e30, 3.0e-45, 7.0, -7.0])  # tiny, huge
    _, out = roundtrip(get(1.0), like)
    for n in like:
        assert torch.equal(out[n], like[n]), n


def test_input_dtypes_and_options() -> None:
    like = {n: t.to(torch.bfloat16) for n, t in lora_like().items()}
    c = get(0.2)
    p = c.encode(like, KEY)
    out = c.decode(p, like=like)
    assert all(out[n].dtype == torch.float32 for n in out)
    for bad in ({"density": 0}, {"density": 1.5}, {"density": True}, {"density": "x"}):
        with pytest.raises(RegistryError, match="density must be a float in"):
            codecs.get("topk", **bad)
    with pytest.raises(RegistryError, match="value_bits must be 32 or 16, got 8"):
        codecs.get("topk", value_bits=8)
    with pytest.raises(RegistryError, match=r"allowed: .*density"):
        codecs.get("topk", k=10)
    with pytest.raises(ValueError, match="non-finite"):
        c.encode({"a": torch.tensor([1.0, float("nan")])}, KEY)


# --- error feedback -------------------------------------------------------------------------


@pytest.mark.parametrize("value_bits", [32, 16])
def test_error_feedback_loses_nothing(value_bits: int) -> None:
    """Σ_t decoded_t + e_T == Σ_t Δ_t, and the residual stays bounded (top-k is contractive)."""
    c = get(0.05, value_bits)
    ef = codecs.ErrorFeedback()
    like = lora_like()
    total = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in like.items()}
    got = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in like.items()}
    delta_max = 0.0
    d = flat(like).numel()
    frac = c.k_of(d) / d
    bound = 2 * math.sqrt(1 - frac) / frac  # ‖e‖ <= 2√(1−δ)/δ · max‖Δ‖ (top-k is contractive)
    for t in range(30):
        delta = lora_like(100 + t)
        delta_max = max(delta_max, float(flat(delta).norm()))
        key = rng.derive_key(7, t)
        sent = ef.apply(delta)
        dec = c.decode(c.encode(sent, key, round=t), like=delta, key=key, round=t)
        ef.update(sent, dec)
        for n in like:
            total[n] += delta[n].double()
            got[n] += dec[n].double()
        assert float(flat(ef.residual).norm()) <= 1.01 * bound * delta_max
    for n in like:
        torch.testing.assert_close(got[n] + ef.residual[n].double(), total[n], rtol=0, atol=1e-4)
    assert float(flat(ef.residual).norm()) > 0  # something was held back, and then accounted for


# --- payload layout and size ----------------------------------------------------------------


@pytest.mark.parametrize("value_bits", [32, 16])
@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 1.0])
def test_payload_size_matches_the_formula(value_bits: int, density: float) -> None:
    like = lora_like()
    c = get(density, value_bits)
    p, out = roundtrip(c, like)
    ks = [int((out[n] != 0).sum()) for n in like]  # random data: every kept value is non-zero
    assert sum(ks) == c.k_of(flat(like).numel())
    sizes = [t.numel() for t in like.values()]
    n = len(like)
    vb = value_bits // 8
    tables = 4 * n * (2 if value_bits == 16 else 1)
    idx = sum((kk * (s - 1).bit_length() + 7) // 8 for kk, s in zip(ks, sizes, strict=True))
    assert len(p) == 40 + tables + vb * sum(ks) + idx + 4 == c.payload_bytes(like, ks)
    assert len(p) <= c.max_payload_bytes(like)
    h, _ = wire.unpack(p, 10**6)
    assert h.codec_id == wire.CODEC_IDS["topk"] == 7 and h.ks == tuple(ks)
    assert (h.round, h.slot, h.key) == (ROUND, SLOT, KEY)


def test_bytes_per_entry_on_a_lora_factor() -> None:
    """16·4096 = 65536 elements: 16-bit indices, so 6 (fp32) or 4 (fp16) bytes per entry."""
    like = {"q.lora_A": torch.randn(16, 4096, generator=torch.Generator().manual_seed(1))}
    assert index_width(65536) == 16 and index_width(65537) == 17 and index_width(1) == 0
    for bits, per, tables in ((32, 6, 4), (16, 4, 8)):
        c = get(0.01, bits)
        p = c.encode(like, KEY)
        assert len(p) == 40 + tables + per * 655 + 4
        assert len(p) <= c.max_payload_bytes(like)


def test_indices_pack_and_unpack() -> None:
    g = np.random.default_rng(0)  # test data only
    for w in (1, 3, 7, 8, 16, 17, 31, 32):
        for k in (1, 7, 8, 9, 100):
            idx = g.integers(0, 1 << w, size=k, dtype=np.int64)
            buf = pack_indices(idx, w)
            assert len(buf) == (k * w + 7) // 8
            back, clean = topk.unpack_indices(buf, k, w)
            assert clean and back.tolist() == idx.tolist()


# --- malformed payloads ---------------------------------------------------------------------

SPEC = {"a": torch.zeros(10), "b": torch.zeros(3, 4)}  # widths 4 and 4 bits


def craft(
    ks: tuple[int, ...],
    values: list[float],
    indices: list[list[int]],
    *,
    coef: int = wire.COEF_FP32,
    flags: int = 0,
    scales: tuple[float, ...] | None = None,
    body_extra: bytes = b"",
    padding: int = 0,
) -> bytes:
    """A payload built by hand (an adversarial encoder): valid framing and CRC."""
    dt = "<f4" if coef == wire.COEF_FP32 else "<f2"
    body = np.asarray(values, dtype=dt).tobytes()
    for blk, kk in zip(indices, ks, strict=True):
        if kk:
            raw = bytearray(pack_indices(np.asarray(blk, dtype=np.int64), 4))
            raw[-1] |= padding
            body += bytes(raw)
    h = wire.Header(
        wire.CODEC_IDS["topk"],
        coef,
        flags,
        ROUND,
        SLOT,
        KEY,
        spec_hash(SPEC),
        ks,
        scales,
    )
    return wire.pack(h, body + body_extra)


def refresh_crc(p: bytes | bytearray) -> bytes:
    body = bytes(p[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def test_crafted_payload_decodes() -> None:
    c = get(0.5)  # d = 22, k = 11
    out = c.decode(craft((2, 1), [1.0, -2.0, 3.0], [[0, 9], [11]]), like=SPEC)
    assert out["a"][[0, 9]].tolist() == [1.0, -2.0] and out["b"].view(-1)[11] == 3.0
    assert float(sum(t.abs().sum() for t in out.values())) == 6.0
    s = craft(
        (1, 0), [-0.5], [[4], []], coef=wire.COEF_FP16, flags=wire.FLAG_SCALES, scales=(4.0, 0.0)
    )
    assert get(0.5, 16).decode(s, like=SPEC)["a"][4] == -2.0


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (craft((2, 0), [1.0, 2.0], [[3, 10], []]), r"index out of range in block 0 \(a\): 10"),
        (craft((1, 1), [1.0, 2.0], [[0], [15]]), r"index out of range in block 1 \(b\): 15 >= 12"),
        (craft((2, 0), [1.0, 2.0], [[5, 3], []]), r"unsorted or duplicate indices in block 0"),
        (craft((0, 2), [1.0, 2.0], [[], [4, 4]]), r"unsorted or duplicate indices in block 1"),
        (craft((12, 0), [1.0] * 12, [list(range(12)), []]), r"wrong count: block 0 \(a\)"),
        (
            craft((10, 2), [1.0] * 12, [list(range(10)), [0, 1]]),
            r"wrong count: payload holds 12 entries, density=0.5 keeps at most k=11",
        ),
        (craft((1, 0), [float("nan")], [[0], []]), r"non-finite value in block 0 \(a\)"),
        (craft((1, 1), [1.0, float("inf")], [[0], [0]]), r"non-finite value in block 1 \(b\)"),
        (
            craft(
                (1, 0),
                [60000.0],
                [[0], []],
                coef=wire.COEF_FP16,
                flags=wire.FLAG_SCALES,
                scales=(1e38, 0.0),
            ),
            r"non-finite value in block 0",
        ),
        (craft((1, 0), [1.0], [[1], []], padding=0x80), "non-zero padding bits"),
        (craft((1, 0), [1.0], [[1], []], body_extra=b"\0"), "body length 6 does not match"),
        (craft((2, 0), [1.0], [[1, 2], []]), "body length 5 does not match the K table"),
        (
            craft((1, 0), [1.0], [[1], []], flags=wire.FLAG_SCALES, scales=(1.0, 1.0)),
            "topk fp32 payloads carry flags 0x0, got 0x4",
        ),
        (
            craft((1, 0), [1.0], [[1], []], coef=wire.COEF_FP16),
            "topk fp16 payloads carry flags 0x4, got 0x0",
        ),
        (
            craft((1, 0), [], [[1], []], coef=wire.COEF_INT8),
            "topk values must be fp32 or fp16, got int8",
        ),
    ],
)
def test_malformed_payloads_are_rejected_by_name(payload: bytes, match: str) -> None:
    with pytest.raises(codecs.PayloadError, match=match):
        get(0.5).decode(payload, like=SPEC)


def test_header_checks_apply() -> None:
    like = lora_like()
    c = get(0.2)
    p = c.encode(like, KEY, round=ROUND, slot=SLOT)
    with pytest.raises(codecs.PayloadError, match="round mismatch"):
        c.decode(p, like=like, round=ROUND + 1)
    with pytest.raises(codecs.PayloadError, match="key mismatch"):
        c.decode(p, like=like, key=KEY + 1)
    with pytest.raises(codecs.PayloadError, match="layout hash mismatch"):
        c.decode(p, like={"x": torch.zeros(221)})
    with pytest.raises(codecs.PayloadError, match=r"codec mismatch.*'topk'.*'dense'"):
        codecs.get("dense").decode(p, like=like)
    with pytest.raises(codecs.PayloadError, match=r"codec mismatch.*'dense'.*'topk'"):
        get(1.0).decode(codecs.get("dense").encode(like, KEY), like=like)
    with pytest.raises(codecs.PayloadError, match="CRC mismatch"):
        c.decode(p[:50] + bytes([p[50] ^ 1]) + p[51:], like=like)
    with pytest.raises(codecs.PayloadError, match="oversized"):
        get(0.01).decode(get(0.5).encode(like, KEY), like=like)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value_bits=st.sampled_from([32, 16]),
    kind=st.sampled_from(["flip", "truncate", "append", "flip-fixcrc", "bytes-fixcrc"]),
    data=st.data(),
)
def test_corruption_never_decodes_silently(value_bits: int, kind: str, data: st.DataObject) -> None:
    """PayloadError, never another exception; with a fixed-up CRC at most a finite decode."""
    like = lora_like()
    c = get(0.2, value_bits)
    p = c.encode(like, KEY, round=ROUND, slot=SLOT)
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
            out = c.decode(bytes(b), like=like)
        except codecs.PayloadError:
            return
        for n in like:
            assert out[n].shape == like[n].shape and bool(torch.isfinite(out[n]).all())
        assert int(sum((t != 0).sum() for t in out.values())) <= c.k_of(221)
        return
    if bytes(b) == p:
        return
    with pytest.raises(codecs.PayloadError):
        c.decode(bytes(b), like=like, key=KEY, round=ROUND, slot=SLOT)


def test_decoding_is_deterministic() -> None:
    like = lora_like()
    c = get(0.3, 16)
    p = c.encode(like, KEY)
    a, b = c.decode(p, like=like), c.decode(p, like=like)
    assert all(torch.equal(a[n], b[n]) for n in like)
    assert c.encode(like, KEY) == p


# --- self-declarations ----------------------------------------------------------------------

BUILT_IN = {
    # name: (replayable, zeroth_order)
    "dense": (True, False),
    "gaussian": (False, False),  # BLAS sums over dense bases
    "rademacher": (False, False),
    "srht": (True, False),
    "countsketch": (True, False),
    "spsa": (True, True),
    "topk": (True, False),
}


def test_every_codec_declares_replayable_and_zeroth_order() -> None:
    assert isinstance(codecs.Codec.__dict__["replayable"], bool)
    assert isinstance(codecs.Codec.__dict__["zeroth_order"], bool)
    assert set(BUILT_IN) <= set(codecs.names())
    for name in codecs.names():  # plug-ins too: the checks read these, so they must be bools
        cls = codecs.REGISTRY.factory(name)
        assert isinstance(cls.replayable, bool), name  # type: ignore[attr-defined]
        assert isinstance(cls.zeroth_order, bool), name  # type: ignore[attr-defined]
    for name, want in BUILT_IN.items():
        cls = codecs.REGISTRY.factory(name)
        got = (cls.replayable, cls.zeroth_order)  # type: ignore[attr-defined]
        assert got == want, name
    assert codecs.get("topk").replayable and not codecs.get("gaussian", k=8).replayable
