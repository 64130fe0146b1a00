"""BOFT (peftjax.adapters.boft): PEFT's butterfly permutations and layout rules,
a float64 reference of PEFT's forward, orthogonality after training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters
from tests import helpers as h

# PEFT 0.21.2 BOFTLayer.block_butterfly_perm(in, block_num / 2**i, block_size / 2,
# m - 1) for factors i >= 1 (factor 0 is the identity), on layouts whose block
# counts are not powers of two or whose half blocks are odd (chunks of 3).
PEFT_PERMS = {
    (24, 6, 2): [[0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11, 12, 13, 14, 18, 19, 20, 15, 16,
                  17, 21, 22, 23]],
    (36, 6, 2): [[0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11, 12, 13, 14, 18, 19, 20, 15, 16,
                  17, 21, 22, 23, 24, 25, 26, 30, 31, 32, 27, 28, 29, 33, 34, 35]],
    (48, 2, 3): [
        [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15, 16, 18, 17, 19, 20, 22,
         21, 23, 24, 26, 25, 27, 28, 30, 29, 31, 32, 34, 33, 35, 36, 38, 37, 39, 40, 42,
         41, 43, 44, 46, 45, 47],
        [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15, 16, 18, 20, 22, 17, 19,
         21, 23, 24, 26, 28, 30, 25, 27, 29, 31, 32, 34, 36, 38, 33, 35, 37, 39, 40, 42,
         44, 46, 41, 43, 45, 47]],
}


@pytest.mark.parametrize("key", sorted(PEFT_PERMS))
def test_boft_permutations_are_peft_s(key):
    n_in, b, m = key
    got = adapters.boft_permutations(n_in, b, n_in // b, m)
    assert got.shape == (m, n_in)
    np.testing.assert_array_equal(got[0], np.arange(n_in))
    np.testing.assert_array_equal(got[1:], np.asarray(PEFT_PERMS[key]))


def _cayley(a):
    """PEFT's cayley_batch in float64: S = (A - Aᵀ)/2, solve(I + S, I - S, left=False)."""
    s = 0.5 * (a - a.T)
    eye = np.eye(a.shape[0])
    return (eye - s) @ np.linalg.inv(eye + s)


def boft_matrix(r):
    """float64 ``M = M_{m-1} ⋯ M_0``, ``M_i = P_i B_i P_iᵀ`` as PEFT's get_delta_weight."""
    r = h.f64(r)
    m, n, b, _ = r.shape
    n_in = n * b
    perms = adapters.boft_permutations(n_in, b, n, m)
    out = np.eye(n_in)
    for i in range(m):
        blocks = np.zeros((n_in, n_in))
        for j in range(n):
            blocks[j * b:(j + 1) * b, j * b:(j + 1) * b] = _cayley(r[i, j])
        p = np.zeros((n_in, n_in))
        p[np.arange(n_in), perms[i]] = 1.0  # PEFT's perm2mat
        out = (p @ blocks @ p.T) @ out
    return out


def ref_boft(w, t, f):
    """float64 ``W' = (M · W0) ⊙ s`` (PEFT's merge on the Flax kernel)."""
    return boft_matrix(t.r) @ h.f64(w) * h.f64(t.s)[None, :]


@pytest.mark.parametrize("shape,kw", [
    # blocks of 6 (butterflies of chunks of 3), three factors
    ((24, 3), dict(block_num=4, n_butterfly_factor=3)),
])
def test_boft_matches_float64_reference(shape, kw):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape)
    x = rng.standard_normal((3, shape[0]))
    with jax.enable_x64(True):
        ad = adapters.boft(**kw, param_dtype=jnp.float64)
        t, f = ad.init(jax.random.key(0), jnp.asarray(w))
        t = adapters.BOFTParams(jnp.asarray(rng.standard_normal(t.r.shape) * 0.4),
                                jnp.asarray(rng.uniform(0.5, 1.5, t.s.shape)))
        want = ref_boft(w, t, f)

        @jax.jit  # one compile instead of many eager ops
        def run(w, t, x):
            got = ad.apply(w, t, f)
            terms = ad.factored.terms(w, t, f)
            assert terms.delta is None and terms.in_scale is None
            return got, ad.unapply(got, t, f, None), (terms.in_map(x) @ w) * terms.out_scale[None]

        got, back, y = run(jnp.asarray(w), t, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(back), w, rtol=1e-10, atol=1e-10)
        # (x·M)·W0 ⊙ s: M and M·W0 never formed
        np.testing.assert_allclose(np.asarray(y), x @ want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_in,kw,match", [
    (10, dict(block_size=4), r"in_features \(10\) must be divisible by block_size \(4\)"),
    (10, dict(block_num=4), r"in_features \(10\) must be divisible by block_num \(4\)"),
    (12, dict(block_size=2, n_butterfly_factor=3), r"block_size \* 2\*\*.* = 8"),
    (24, dict(block_num=6, n_butterfly_factor=3), r"block_num \(6\) must be a multiple"),
    (12, dict(block_num=2, n_butterfly_factor=3), r"block_num \(2\) must be a multiple"),
    (12, dict(block_size=3, n_butterfly_factor=2), r"block size \(3\) must be even"),
    (6, dict(block_num=2, n_butterfly_factor=2), r"block size \(3\) must be even"),
])
def test_boft_refuses_peft_s_invalid_layouts_naming_the_matrix(n_in, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        adapters.boft(**kw).init(jax.random.key(0), jnp.ones((n_in, 3)))
    assert f"matrix shape ({n_in}, 3)" in str(e.value)


def test_boft_stays_orthogonal_after_50_adam_steps():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    ad = adapters.boft(2, n_butterfly_factor=3)
    t, f = ad.init(jax.random.key(0), w)
    opt = optax.adam(0.1)
    state = opt.init(t)

    @jax.jit
    def step(t, state):
        g = jax.grad(lambda tt: jnp.sum((ad.apply(w, tt, f) - target) ** 2))(t)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int/float
            up, state = opt.update(g, state)
            return optax.apply_updates(t, up), state

    for _ in range(50):
        t, state = step(t, state)
    rot = np.asarray(adapters._boft._blocks(t.r))  # the float32 blocks
    eye = np.eye(2)
    assert np.abs(rot - eye).max() > 0.05  # it did rotate
    np.testing.assert_allclose(np.einsum("mnji,mnjk->mnik", rot, rot),
                               np.broadcast_to(eye, rot.shape), atol=2e-6)
    # the whole float32 butterfly product M = apply(I) / s is orthogonal too
    full = np.asarray(ad.apply(jnp.eye(8), adapters.BOFTParams(t.r, jnp.ones(8)), f))
    assert np.abs(full - np.eye(8)).max() > 0.05
    np.testing.assert_allclose(full.T @ full, np.eye(8), atol=2e-6)
    assert np.abs(np.asarray(t.s) - 1).max() > 0.05  # the scale trained as well


def test_boft_bad_arguments():
    with pytest.raises(ValueError, match="not both"):
        adapters.boft(4, block_num=2)
    with pytest.raises(ValueError, match="n_butterfly_factor must be >= 1"):
        adapters.boft(4, n_butterfly_factor=0)
    with pytest.raises(TypeError, match="init_weights must be a bool"):
        adapters.boft(4, init_weights=1)
    with pytest.raises(TypeError, match="block_size must be an int"):
        adapters.boft(2.0)
