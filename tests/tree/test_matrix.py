"""DimensionNumbers: defaults, explicit layouts, round trips, errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import tree


def test_defaults():
    r2 = tree.resolve(None, (4, 3))
    assert (r2.n_in, r2.n_out, r2.batch_shape) == (4, 3, ())
    # A 3-D leaf is never guessed to be stacked layers: (L, in, out) and
    # (embed, heads, head_dim) look alike.
    assert tree.default_dimension_numbers(3) is None
    with pytest.raises(ValueError, match=r"attn/query/kernel: shape \(16, 4, 8\)"):
        tree.resolve(None, (16, 4, 8), path="attn/query/kernel")


def test_rank4_needs_explicit_dims():
    with pytest.raises(ValueError, match=r"blk/kernel: shape \(2, 3, 4, 5\)"):
        tree.resolve(None, (2, 3, 4, 5), path="blk/kernel")


@pytest.mark.parametrize("shape,n_layer", [((16, 4, 8), 0), ((2, 16, 4, 8), 1),
                                           ((3, 3, 4, 8), 0)])
def test_no_view_error_lists_views_that_are_valid_expressions(shape, n_layer):
    """Each suggested view is a copy-pasteable expression that resolves."""
    import re

    from peftjax.tree import _matrix

    msg = str(_matrix.no_view_error("m/kernel", shape, n_layer))
    assert msg.startswith(f"m/kernel: shape {shape}")
    exprs = re.findall(r"DimensionNumbers\((?:[^()]|\([^()]*\))*\)", msg)
    assert len(exprs) >= 2
    for e in exprs:
        dims = eval(e, {"DimensionNumbers": tree.DimensionNumbers})  # noqa: S307
        r = tree.resolve(dims, shape)
        assert r.batch[:n_layer] == tuple(range(n_layer))
    # The head-split suggestion is the view of an (embed, heads, head_dim) kernel.
    if shape == (16, 4, 8):
        first = eval(exprs[0], {"DimensionNumbers": tree.DimensionNumbers})  # noqa: S307
        assert first == tree.dims.head_split()


def test_presets_resolve_to_the_documented_matrices():
    cases = [
        (tree.dims.dense(), (4, 3), (4, 3)),
        (tree.dims.transposed(), (3, 4), (4, 3)),
        (tree.dims.stacked(), (5, 4, 3), (5, 4, 3)),
        (tree.dims.stacked(2), (2, 5, 4, 3), (2, 5, 4, 3)),
        (tree.dims.head_split(), (16, 4, 8), (16, 32)),
        (tree.dims.head_merge(), (4, 8, 16), (32, 16)),
        (tree.dims.linear_general(n_in=2, n_out=1, n_batch=1), (3, 4, 8, 16), (3, 32, 16)),
        (tree.dims.conv(), (3, 3, 4, 8), (36, 8)),
        (tree.dims.conv(1), (5, 4, 8), (20, 8)),
        (tree.dims.einsum("btd,dhk->bthk"), (16, 4, 8), (16, 32)),
        (tree.dims.einsum("bthk,hkd->btd"), (4, 8, 16), (32, 16)),
        (tree.dims.einsum("ebd,edf->ebf"), (3, 4, 5), (3, 4, 5)),
    ]
    for dims, shape, mat in cases:
        r = tree.resolve(dims, shape)
        assert tree.to_matrix(jnp.zeros(shape), r).shape == mat, (dims, shape)
    with pytest.raises(ValueError, match="summed away"):
        tree.dims.einsum("bd,dk->b")
    with pytest.raises(ValueError, match="two operands"):
        tree.dims.einsum("bd->b")
    with pytest.raises(ValueError, match="spatial"):
        tree.dims.conv(0)


@pytest.mark.parametrize("dims,shape,mat", [
    (tree.DimensionNumbers(0, (1, 2)), (6, 2, 3), (6, 6)),
    (tree.DimensionNumbers((0, 1), 2), (2, 3, 6), (6, 6)),
    (tree.DimensionNumbers(1, 0), (4, 3), (3, 4)),  # Equinox (out, in)
    (tree.DimensionNumbers(2, 3, batch_axis=(0, 1)), (2, 3, 4, 5), (2, 3, 4, 5)),
    (tree.DimensionNumbers(1, (0, 2), batch_axis=3), (2, 3, 4, 5), (5, 3, 8)),
])
def test_round_trip(dims, shape, mat):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    r = tree.resolve(dims, shape)
    m = tree.to_matrix(x, r)
    assert m.shape == mat
    np.testing.assert_array_equal(np.asarray(tree.from_matrix(m, r)), np.asarray(x))


def test_equinox_layout_is_transpose():
    w = jnp.arange(12.0).reshape(4, 3)  # (out, in)
    r = tree.resolve(tree.DimensionNumbers(reduction_axis=1, output_axis=0), w.shape)
    np.testing.assert_array_equal(np.asarray(tree.to_matrix(w, r)), np.asarray(w.T))


def test_invalid_dims():
    with pytest.raises(ValueError, match="uses an axis twice"):
        tree.resolve(tree.DimensionNumbers(0, 0), (3, 3))
    with pytest.raises(ValueError, match="does not cover axes"):
        tree.resolve(tree.DimensionNumbers(0, 1), (3, 3, 3))
    with pytest.raises(ValueError, match="out of range"):
        tree.resolve(tree.DimensionNumbers(0, 5), (3, 3))
    with pytest.raises(TypeError):
        tree.DimensionNumbers(0.5, 1)
