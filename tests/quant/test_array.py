"""peftjax.quant arrays: pytree behaviour, quantize_params, bytes, the tiled matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import quant, tree
from peftjax.quant import _matmul
from tests.helpers import EXACT, MATMUL_F32, f64


def _w(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_pytree_jit_stack_and_unstack_keep_the_logical_shape():
    layers = {"layers": {str(i): {"kernel": quant.quantize(_w((64, 24), i),
                                                          quant.q4_1())}
                         for i in range(3)}}
    stacked = tree.stack_layers(layers)
    k = stacked["layers"]["kernel"]
    assert quant.is_quantized(k) and k.shape == (3, 64, 24) and k.axis == 1
    for i in range(3):
        np.testing.assert_array_equal(
            np.asarray(quant.dequantize(k))[i],
            np.asarray(quant.dequantize(layers["layers"][str(i)]["kernel"])))
    back = tree.unstack_layers(stacked)
    assert back["layers"][1]["kernel"].shape == (64, 24)
    # A jit argument: leaves are the blocks; the result is the dequantised value.
    out = jax.jit(lambda q: quant.dequantize(q)[1])(k)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(quant.dequantize(k))[1])


def test_quantize_params_abstract_and_nbytes():
    p = {"attn": {"kernel": _w((64, 8))}, "emb": _w((10, 32)), "norm": jnp.ones(8)}
    rules = [tree.Rule(where="emb", then=quant.q8_0(axis=-1)),
             tree.Rule(where=r".*kernel", then=quant.nf4(block_size=32))]
    qp = quant.quantize_params(p, rules)
    assert isinstance(qp["norm"], jax.Array)
    a = quant.abstract(qp)
    assert a["attn"]["kernel"] == jax.ShapeDtypeStruct((64, 8), jnp.float32)
    assert a["emb"] == jax.ShapeDtypeStruct((10, 32), jnp.float32)
    # nf4: 4 bits per value + one float32 scale per 32; q8_0: 34 bytes per 32.
    want = 64 * 8 // 2 + (64 * 8 // 32) * 4 + 10 * 34 + 8 * 4
    assert quant.nbytes(qp) == want
    # Device bytes agree with XLA's own count of the arguments.
    c = jax.jit(lambda t: jax.tree.map(lambda x: x, t)).lower(qp).compile()
    assert c.memory_analysis().argument_size_in_bytes == want
    with pytest.raises(TypeError, match="'attn/kernel'.*QuantFormat"):
        quant.quantize_params(p, [tree.Rule(where=r".*kernel", then="nf4")])
    with pytest.raises(ValueError, match=r"'emb'.*\(10, 32\).*float32.*10 values"):
        quant.quantize_params(p, [tree.Rule(where="emb", then=quant.q8_0())])


def test_quantize_rejects_non_float_and_bad_axes():
    with pytest.raises(TypeError, match=r"\(64, 2\).*int32"):
        quant.quantize(jnp.ones((64, 2), jnp.int32), quant.int8())
    with pytest.raises(ValueError, match=r"axis -3.*\(64, 2\)"):
        quant.quantize(jnp.ones((64, 2)), quant.int8(axis=-3))
    with pytest.raises(TypeError, match="QuantFormat"):
        quant.quantize(jnp.ones((64, 2)), "int8")


@pytest.mark.parametrize("fmt", [quant.q4_1(), quant.int4(block_size=32)],
                         ids=["q4_1", "int4"])
def test_tiled_matmul_and_its_gradient_equal_the_dequantised_product(fmt):
    w = quant.quantize(_w((96, 50)), fmt)
    wd = f64(quant.dequantize(w))
    x = _w((2, 3, 96), 1)
    dy = f64(_w((2, 3, 50), 2))
    # 256 bytes per tile: one column of 96 float32 values, 50 tiles; the
    # default: 25 columns per tile (at most half of the kernel).
    # float32 sums of 96 (50) products: the tolerance is MATMUL_F32's rtol
    # times the sum of the products' magnitudes (values may cancel).
    tol_y = MATMUL_F32["rtol"] * (np.abs(f64(x)) @ np.abs(wd)) + MATMUL_F32["atol"]
    tol_x = MATMUL_F32["rtol"] * (np.abs(dy) @ np.abs(wd.T)) + MATMUL_F32["atol"]
    for tile in (256, quant.DEFAULT_TILE_BYTES):
        @jax.jit
        def f(x, dy, w, tile=tile):
            y, vjp = jax.vjp(lambda x: quant.matmul(x, w, tile_bytes=tile), x)
            return y, vjp(dy)[0]

        y, dx = f(x, jnp.asarray(dy, jnp.float32), w)
        assert np.all(np.abs(f64(y) - f64(x) @ wd) <= tol_y)
        assert np.all(np.abs(f64(dx) - dy @ wd.T) <= tol_x)


def test_tile_columns_never_span_a_whole_kernel():
    # SmolLM2's kernels (in, out) at the default 1 MiB of float32 per tile.
    for n_in, n_out in [(576, 576), (576, 192), (576, 1536), (1536, 576),
                        (576, 49152)]:
        c = _matmul.tile_columns(n_in, n_out, 4, quant.DEFAULT_TILE_BYTES)
        assert 1 <= c <= n_out // 2 and n_in * c * 4 <= quant.DEFAULT_TILE_BYTES
    assert _matmul.tile_columns(64, 97, 4, 1 << 20) == 48  # prime: a tail of 1
    assert _matmul.tile_columns(64, 100, 4, 1 << 20) == 50


def test_tiled_product_on_raw_blocks_equals_the_dequantised_product():
    w = quant.quantize(_w((64, 10), 3), quant.nf4(block_size=32))
    x = _w((3, 64), 4)
    wd = f64(quant.dequantize(w))
    tol = MATMUL_F32["rtol"] * (np.abs(f64(x)) @ np.abs(wd)) + MATMUL_F32["atol"]
    for tile in (256, quant.DEFAULT_TILE_BYTES):  # 256 bytes: one column per tile
        y = quant.tiled_product(x, w.blocks, w.format, jnp.float32, tile_bytes=tile)
        assert y.shape == (3, 10) and y.dtype == jnp.float32
        assert np.all(np.abs(f64(y) - f64(x) @ wd) <= tol)
    stacked = quant.quantize(_w((2, 64, 10), 5), quant.nf4(block_size=32))
    with pytest.raises(ValueError, match=r"grid \(2, 10, 2\)"):
        quant.tiled_product(x, stacked.blocks, stacked.format, jnp.float32)


def test_matmul_errors_name_shapes():
    w = quant.quantize(_w((64, 32)), quant.int8(block_size=32, axis=-1))
    with pytest.raises(ValueError, match=r"\(64, 32\).*axis 1"):
        quant.matmul(jnp.ones((2, 64)), w)
    w = quant.quantize(_w((64, 8)), quant.int8(block_size=32))
    with pytest.raises(ValueError, match=r"\(2, 63\).*\(64, 8\)"):
        quant.matmul(jnp.ones((2, 63)), w)
    with pytest.raises(TypeError, match="QuantizedArray"):
        quant.matmul(jnp.ones((2, 64)), jnp.ones((64, 8)))
    np.testing.assert_allclose(f64(quant.matmul(jnp.zeros((1, 64)), w)), 0.0, **EXACT)
