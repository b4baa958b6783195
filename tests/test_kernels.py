"""The compiled CPU kernels equal the numpy / torch reference paths bit for bit (issue 4).

The kernels only make the codecs faster: any difference in a value would change what a
server reconstructs, so every kernel is checked against the path it replaces, over sizes
that cross its internal chunk and radix boundaries, and the whole codec is checked against a
process that runs with ``FEDTUNE_NUMBA=0``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune import kernels, rng
from fedtune.codecs.srht import _fwht_numpy

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")

KEYS = st.integers(0, (1 << 64) - 1)
# sizes around the kernels' boundaries: 8-value groups, 32-bit sign words, 128-sign Philox
# blocks and 512-block batches (65,536 signs, 2,048 words)
SIZES = [1, 2, 3, 7, 8, 9, 31, 32, 33, 127, 128, 129, 2047, 2048, 2049, 65535, 65536, 65537]


@settings(max_examples=40, deadline=None)
@given(key=KEYS, stream=KEYS, tag=st.sampled_from([0, 1, 2]), first=st.integers(0, 1 << 40))
def test_philox_blocks_equal_the_numpy_rounds(key: int, stream: int, tag: int, first: int) -> None:
    out = np.empty((37, 4), dtype=np.uint64)
    kernels.philox_blocks(kernels.key_words(key, stream, tag), first, out)
    assert np.array_equal(out, rng._blocks_numpy_ref(key, stream, tag, first, 37))


@pytest.mark.parametrize("d", SIZES)
def test_countsketch_kernels_equal_the_torch_formula(d: int) -> None:
    key, block, k = 0xFEDCBA9876543210, 5, max(1, d // 3)
    x = rng.normal(3, d, d)
    w = rng.bits32(key, block, d)
    sign = (1 - 2 * (w & 1)).to(torch.float32)
    bucket = ((w >> 1) * k) >> 31
    words = kernels.key_words(key, block, rng.TAG_BITS)
    y = np.zeros(k, dtype=np.float32)
    kernels.countsketch(x.numpy(), y, words, False)
    # float32 sums in index order, as torch's single-threaded index_add_
    want = torch.zeros(k, dtype=torch.float64).index_add_(0, bucket, (sign * x).double())
    assert np.allclose(y, want.numpy(), rtol=1e-5, atol=1e-5)
    ys = torch.from_numpy(y)
    out = np.empty(d, dtype=np.float32)
    kernels.countsketch(out, y, words, True)
    assert torch.equal(torch.from_numpy(out), sign * ys.index_select(0, bucket))


@pytest.mark.parametrize("d", [*SIZES, 200_000])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_sign_flip_equals_rademacher_times_x(d: int, scale: float) -> None:
    key = 123456789
    x = rng.normal(4, 1, d)
    x[::5] = 0.0  # signed zeros too
    out = np.empty(d, dtype=np.float32)
    kernels.sign_flip(x.numpy(), out, np.float32(scale), kernels.key_words(key, 6, rng.TAG_SIGN))
    want = x * rng.rademacher(key, 6, d) * scale
    assert np.array_equal(out.view(np.uint32), want.numpy().view(np.uint32))


def test_sign_flip_in_place() -> None:
    x = rng.normal(4, 2, 1000)
    buf = x.numpy().copy()
    kernels.sign_flip(buf, buf, np.float32(2.0), kernels.key_words(9, 1, rng.TAG_SIGN))
    assert torch.equal(torch.from_numpy(buf), x * rng.rademacher(9, 1, 1000) * 2.0)


@pytest.mark.parametrize("log_n", range(0, 17))
def test_fwht_rows_equals_the_radix2_reference(log_n: int) -> None:
    n = 1 << log_n
    z = rng.normal(5, log_n, 3 * n).reshape(3, n).numpy()
    got = z.copy()
    kernels.fwht_rows(got)
    assert np.array_equal(got, _fwht_numpy(z))


@settings(max_examples=40, deadline=None)
@given(
    key=KEYS, stream=st.integers(0, 1000), population=st.integers(2, 5000), frac=st.floats(0, 0.5)
)
def test_first_distinct_equals_rng_choice(
    key: int, stream: int, population: int, frac: float
) -> None:
    k = max(1, int(population * frac))
    got = kernels.first_distinct(population, k, kernels.key_words(key, stream, rng.TAG_BITS))
    assert torch.equal(torch.from_numpy(got), rng.choice(key, stream, population, k))


@pytest.mark.parametrize("d", [0, 1, 7, 8, 9, 1000])
def test_sum_squares(d: int) -> None:
    x = rng.normal(6, d, d)
    assert kernels.sum_squares(x.numpy()) == pytest.approx(
        float(x.double().pow(2).sum()), rel=1e-12
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_sum_squares_is_not_finite_iff_a_value_is_not(bad: float) -> None:
    x = np.full(17, 3e38, dtype=np.float32)  # the largest float32s do not overflow in float64
    assert np.isfinite(kernels.sum_squares(x))
    x[11] = bad
    assert not np.isfinite(kernels.sum_squares(x))


_CODEC_SCRIPT = """
import sys, torch
from fedtune import codecs, kernels, rng
assert kernels.AVAILABLE == (sys.argv[2] == "1"), kernels.AVAILABLE
torch.set_num_threads(1)
delta = {f"t{i}": rng.normal(1, i, 300 + 977 * i) for i in range(9)}
delta["tiny"] = rng.normal(3, 3, 5)
out = {}
for name in ("countsketch", "srht"):
    for k in (16, 2000, 9000):
        for bits in (32, 8):
            c = codecs.get(name, k=k, coef_bits=bits, unbiased=bits == 32)
            p = c.encode(delta, 7, round=1, slot=2)
            out[f"{name}-{k}-{bits}"] = (p, c.decode(p, like=delta, key=7, round=1, slot=2))
torch.save(out, sys.argv[1])
"""


def test_codecs_equal_the_fallback_path(tmp_path: Path) -> None:
    """Payloads and decoded updates with the kernels equal those of the numpy/torch path."""
    root = Path(__file__).resolve().parents[1]
    results = {}
    for flag in ("1", "0"):
        path = tmp_path / f"out{flag}.pt"
        env = {**os.environ, "FEDTUNE_NUMBA": flag, "PYTHONPATH": str(root)}
        subprocess.run(
            [sys.executable, "-c", _CODEC_SCRIPT, str(path), flag], check=True, env=env, cwd=root
        )
        results[flag] = torch.load(path)
    assert results["1"].keys() == results["0"].keys()
    for name, (payload, decoded) in results["1"].items():
        ref_payload, ref_decoded = results["0"][name]
        assert payload == ref_payload, name
        for t in decoded:
            assert torch.equal(decoded[t], ref_decoded[t]), (name, t)


@pytest.mark.parametrize("d", SIZES)
def test_quantize_int8_equals_the_torch_expression(d: int) -> None:
    y = rng.normal(8, d, d) * 3.0
    scale = float(y.abs().max()) / 127.0
    u = rng.uniform(77, 3, d)
    want = torch.floor(y / scale + u).clamp_(-127, 127).to(torch.int8)
    got = kernels.quantize_int8(y.numpy(), np.float32(scale), kernels.key_words(77, 3, 0))
    assert np.array_equal(got, want.numpy())
