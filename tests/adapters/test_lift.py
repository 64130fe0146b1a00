"""adapters._lift: map_slices (slice-by-slice init over batch axes) and path_key."""

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters


def test_map_slices_equals_a_loop_over_the_batch_axes():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 5, 4)), jnp.float32)
    keys = jax.random.split(jax.random.key(1), 6).reshape(2, 3)

    def one(k, m):  # an SVD, as the data-driven initialisers run per slice
        u, s, _ = jnp.linalg.svd(m, full_matrices=False)
        return u[:, :2] * s[None, :2], jax.random.normal(k, (2,))

    got_u, got_n = adapters.map_slices(one, 2)(keys, x)
    assert got_u.shape == (2, 3, 5, 2) and got_n.shape == (2, 3, 2)
    for i in range(2):
        for j in range(3):
            u, s, _ = np.linalg.svd(np.asarray(x[i, j], np.float64), full_matrices=False)
            # Singular vectors are defined up to sign: compare |u·s|.
            np.testing.assert_allclose(np.abs(np.asarray(got_u[i, j])),
                                       np.abs(u[:, :2] * s[:2]), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(
                np.asarray(got_n[i, j]), np.asarray(jax.random.normal(keys[i, j], (2,))))


def test_map_slices_passes_abstract_leaves_as_per_slice_structs():
    seen = []

    def one(m, spec):
        seen.append((tuple(spec.shape), spec.dtype))
        return m.sum()

    out = adapters.map_slices(one, 1)(jnp.ones((3, 2, 2)),
                                      jax.ShapeDtypeStruct((3, 4, 5), jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(out), np.full((3,), 4.0, np.float32))
    assert seen and all(s == ((4, 5), jnp.bfloat16) for s in seen)


def test_path_key_depends_on_the_path_only():
    k = jax.random.key(3)
    a, b = adapters.path_key(k, "x/kernel"), adapters.path_key(k, "y/kernel")
    data = jax.random.key_data
    assert not np.array_equal(np.asarray(data(a)), np.asarray(data(b)))
    np.testing.assert_array_equal(np.asarray(data(a)),
                                  np.asarray(data(adapters.path_key(k, "x/kernel"))))
