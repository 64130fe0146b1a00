"""OFT (peftjax.adapters.oft): PEFT's block layout on uneven shapes, the Cayley and
Neumann rotations in float64, COFT's projection, orthogonality after training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters
from tests import helpers as h


def _rotations(q, neumann):
    """float64 per-block rotations from the upper-triangular entries ``q (n, m)``."""
    q = h.f64(q)
    b = int(round((1 + np.sqrt(1 + 8 * q.shape[-1])) / 2))
    rows, cols = np.triu_indices(b, 1)
    out = []
    for v in q:
        s = np.zeros((b, b))
        s[rows, cols] = v
        s = s - s.T
        eye = np.eye(b)
        if neumann is None:  # PEFT: solve(I + Q, I - Q, left=False)
            out.append((eye - s) @ np.linalg.inv(eye + s))
            continue
        k = max(neumann, 4) if neumann == 3 else neumann
        terms = [eye] + [2.0 * np.linalg.matrix_power(s, j) for j in range(1, k - 1)]
        if k > 1:
            terms.append(np.linalg.matrix_power(s, k - 1) * (1.0 if k > 2 else 2.0))
        out.append(sum(terms))
    return np.stack(out)


def ref_oft(w, t, f, *, neumann=5):
    """float64 ``diag(R_1..R_n) · W0`` (a shared block repeated)."""
    w = h.f64(w)
    rot = _rotations(t.q, neumann)
    n = w.shape[0] // rot.shape[-1]
    rot = np.broadcast_to(rot, (n,) + rot.shape[1:])
    full = np.zeros((w.shape[0], w.shape[0]))
    b = rot.shape[-1]
    for i in range(n):
        full[i * b:(i + 1) * b, i * b:(i + 1) * b] = rot[i]
    return full @ w


def oft_count(n_in, b):
    return n_in * (b - 1) // 2


# PEFT 0.21.2 on nn.Linear(in, 3): (in, config) -> (oft_R.weight shape, block size),
# each adjusted case with PEFT's "Invalid ... Adjusted" warning.
PEFT_LAYOUT = [
    (10, dict(block_size=4), (2, 10), 5),
    (10, dict(r=4), (5, 1), 2),
    (12, dict(block_size=5), (3, 6), 4),
    (7, dict(block_size=3), (7, 0), 1),
    (6, dict(block_size=8), (1, 15), 6),
    (9, dict(r=2), (1, 36), 9),
    (12, dict(r=5), (4, 3), 3),
]


@pytest.mark.parametrize("n_in,kw,shape,b", PEFT_LAYOUT)
def test_oft_uneven_blocks_follow_peft(n_in, kw, shape, b):
    assert adapters.oft_block_size(n_in, **kw) == b
    w = jnp.ones((n_in, 3))
    with pytest.warns(UserWarning, match=rf"does not divide .*in={n_in}.*block size {b}"):
        t, _ = adapters.oft(**kw).init(jax.random.key(0), w)
    assert t.q.shape == shape


@pytest.mark.parametrize("kw,neumann", [
    (dict(r=2, use_cayley_neumann=False), None),
    (dict(block_size=3), 5),
    (dict(block_size=3, num_cayley_neumann_terms=3), 3),
    (dict(block_size=2, block_share=True, use_cayley_neumann=False), None),
])
def test_oft_matches_float64_reference(kw, neumann):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5))
    x = rng.standard_normal((4, 6))
    with jax.enable_x64(True):
        ad = adapters.oft(**kw, param_dtype=jnp.float64)
        t, f = ad.init(jax.random.key(0), jnp.asarray(w))
        t = adapters.OFTParams(jnp.asarray(rng.standard_normal(t.q.shape) * 0.4))
        want = ref_oft(w, t, f, neumann=neumann)
        got = ad.apply(jnp.asarray(w), t, f)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(got, t, f, None)), w,
                                   rtol=1e-10, atol=1e-10)
        terms = ad.factored.terms(jnp.asarray(w), t, f)
        assert terms.delta is None and terms.in_scale is None
        y = np.asarray(terms.in_map(jnp.asarray(x))) @ w  # (x·R)·W0, R·W0 never formed
        np.testing.assert_allclose(y, x @ want, rtol=1e-12, atol=1e-12)


def test_coft_projects_each_block_with_a_straight_through_gradient():
    # PEFT's _project_batch: ‖Q‖_F over the skew matrix, radius eps/sqrt(n stored).
    q = jnp.asarray([[0.3, -0.1, 0.2], [1e-6, 0.0, 0.0]])
    eps = 0.05
    got = adapters.oft_project(q, eps)
    radius = eps / np.sqrt(2)
    norm0 = np.sqrt(2) * np.linalg.norm(h.f64(q[0]))
    np.testing.assert_allclose(np.asarray(got[0]), h.f64(q[0]) * radius / norm0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(q[1]))
    ad = adapters.oft(r=2, coft=True, eps=eps, use_cayley_neumann=False)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((6, 4)), jnp.float32)
    want = ref_oft(w, adapters.OFTParams(got), None, neumann=None)

    def loss(qq):
        wp = ad.apply(w, adapters.OFTParams(qq), None)
        return jnp.sum(wp), wp

    g, wp = jax.jit(jax.grad(loss, has_aux=True))(q)
    np.testing.assert_allclose(h.f64(wp), want, **h.MATMUL_F32)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize("kw", [dict(r=2), dict(block_size=3, block_share=True),
                                dict(r=2, coft=True, eps=0.5)])
def test_oft_strict_variants_stay_orthogonal_after_50_steps(kw):
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    ad = adapters.oft(**kw, use_cayley_neumann=False)
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
    rot = np.asarray(adapters._oft.rotations(t.q, coft=kw.get("coft", False),
                                             eps=kw.get("eps", 6e-5), neumann_terms=None))
    eye = np.eye(rot.shape[-1])
    assert np.abs(rot - eye).max() > 0.05  # it did rotate
    np.testing.assert_allclose(np.einsum("nji,njk->nik", rot, rot),
                               np.broadcast_to(eye, rot.shape), atol=2e-6)
    # PEFT's default Neumann series at the same q is only approximately orthogonal.
    approx = np.asarray(adapters._oft.rotations(t.q, neumann_terms=5))
    assert np.abs(np.einsum("nji,njk->nik", approx, approx) - eye).max() > 1e-4


def test_oft_bad_arguments():
    with pytest.raises(ValueError, match="not both"):
        adapters.oft(4, r=2)
    with pytest.raises(TypeError, match="coft must be a bool"):
        adapters.oft(4, coft=1)
    with pytest.raises(TypeError, match="block_size must be an int"):
        adapters.oft(2.0)
    with pytest.raises(ValueError, match="eps"):
        adapters.oft(4, eps=0.0)
