"""peftjax.quant formats: round-trip bounds (float64), GGUF blocks bit for bit."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import quant
from tests.helpers import EXACT, f64

# The NF4 code book as published (QLoRA, arXiv:2305.14314, appendix E).
NF4_PAPER = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
# Slack for float32 arithmetic inside the quantisers (scaling, rounding) on
# top of each derived bound: a few float32 ulps of the block's magnitude.
ULPS = 8 * np.finfo(np.float32).eps
F16_HALF_ULP = 2.0 ** -11  # relative rounding error of a normal float16


def _weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * rng.uniform(0.01, 2.0, size=shape[:-2] + (1, 1))
    w[..., 0, 0] = 0.0
    return w.astype(np.float32)


def _blocks64(x, axis, bs):
    """float64 view ``(..., nb, bs)`` of ``x`` blocked along ``axis``."""
    x = np.moveaxis(f64(x), axis, -1)
    return x.reshape(x.shape[:-1] + (x.shape[-1] // bs, bs))


def _bound(fmt, b):
    """The per-value error bound of ``fmt`` on float64 blocks ``b`` (..., nb, bs)."""
    amax = np.abs(b).max(-1, keepdims=True)
    if fmt.name == "int8":
        return amax / 255.0  # s/2 with s = amax/127.5
    if fmt.name == "int4":
        return amax / 15.0  # s/2 with s = amax/7.5
    if fmt.name == "nf4":
        return amax * np.diff(NF4_PAPER).max() / 2
    if fmt.name == "q8_0":
        d = amax / 127.0
        return d / 2 + 127 * d * F16_HALF_ULP
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = (hi - lo) / 15.0
    return d / 2 + 15 * d * F16_HALF_ULP + np.abs(lo) * F16_HALF_ULP


FORMATS = [quant.int8(block_size=32), quant.int4(block_size=16),
           quant.nf4(block_size=64), quant.q8_0(), quant.q4_1()]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("axis", [-2, -1])
def test_round_trip_error_within_the_format_bound(fmt, axis):
    w = _weights((3, 128, 64))
    fmt = fmt._replace(axis=axis)
    q = quant.quantize(jnp.asarray(w), fmt)
    assert q.shape == w.shape and q.dtype == np.float32
    d = quant.dequantize(q)
    assert d.shape == w.shape and d.dtype == jnp.float32
    bw, bd = _blocks64(w, axis, fmt.block_size), _blocks64(d, axis, fmt.block_size)
    err = np.abs(bd - bw)
    bound = _bound(fmt, bw)
    amax = np.abs(bw).max(-1, keepdims=True)
    assert np.all(err <= bound + ULPS * amax), float((err - bound).max())
    # The bound is tight: some value's error uses most of it.
    nz = np.broadcast_to(bound > 0, err.shape)
    assert (err / np.where(bound > 0, bound, 1.0))[nz].max() > 0.5
    # A zero block stays exactly zero.
    z = quant.dequantize(quant.quantize(jnp.zeros((64, 64)), fmt))
    np.testing.assert_array_equal(np.asarray(z), 0.0)


def test_nf4_values_are_the_published_code_book_times_the_block_absmax():
    w = _weights((64, 8), seed=1)
    d = _blocks64(quant.dequantize(quant.quantize(jnp.asarray(w), quant.nf4())), -2, 64)
    b = _blocks64(w, -2, 64)
    amax = np.abs(b).max(-1, keepdims=True)
    nearest = NF4_PAPER[np.abs(b[..., None] / amax[..., None] - NF4_PAPER).argmin(-1)]
    np.testing.assert_allclose(d, nearest * amax, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt,qtype", [
    (quant.q8_0(axis=-1), gguf.GGMLQuantizationType.Q8_0),
    (quant.q4_1(axis=-1), gguf.GGMLQuantizationType.Q4_1)], ids=["q8_0", "q4_1"])
def test_gguf_blocks_bit_exact_against_the_gguf_package(fmt, qtype):
    x = _weights((40, 256), seed=2) * np.float32(0.1)
    ref = gguf.quants.quantize(x, qtype)  # (rows, nb * type_size) bytes
    ours = quant.quantize(jnp.asarray(x), fmt)
    theirs = quant.gguf_blocks(fmt, ref)
    for a, b in zip(ours.blocks, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), b.view(np.uint8))
    # Decoding their blocks gives gguf's own dequantisation exactly.
    kept = quant.QuantizedArray(jax.tree.map(jnp.asarray, theirs), fmt, np.float32)
    np.testing.assert_allclose(np.asarray(quant.dequantize(kept)),
                               gguf.quants.dequantize(ref, qtype), **EXACT)


def test_formats_compare_by_value_and_reject_bad_arguments():
    assert quant.nf4() == quant.nf4() and hash(quant.q4_1()) == hash(quant.q4_1())
    assert quant.int8(block_size=32) != quant.int8(block_size=64)
    with pytest.raises(ValueError, match="block_size"):
        quant.int4(block_size=0)
    with pytest.raises(TypeError, match="axis"):
        quant.nf4(axis=1.0)
    with pytest.raises(ValueError, match=r"\(2, 33\).*q4_1"):
        quant.gguf_blocks(quant.q4_1(), np.zeros((2, 33), np.uint8))
