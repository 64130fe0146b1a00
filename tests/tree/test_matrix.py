"""DimensionNumbers: defaults, explicit layouts, round trips, errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import tree


def test_defaults():
    r2 = tree.resolve(None, (4, 3))
    assert (r2.n_in, r2.n_out, r2.batch_shape) == (4, 3, ())
    r3 = tree.resolve(None, (5, 4, 3))
    assert (r3.n_in, r3.n_out, r3.batch_shape) == (4, 3, (5,))


def test_rank4_needs_explicit_dims():
    with pytest.raises(ValueError, match=r"blk/kernel: shape \(2, 3, 4, 5\)"):
        tree.resolve(None, (2, 3, 4, 5), path="blk/kernel")


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
