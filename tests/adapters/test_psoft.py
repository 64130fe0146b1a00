"""PSOFT (peftjax.adapters.psoft): PEFT's OrthLayer and get_delta_weight in float64
(exact Cayley, Cayley-Neumann with the Frobenius bound, free R, pissa_init), the SVD
basis, exact unfold, the factored form, orthogonality after training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters
from tests import helpers as h


def _peft_r(t, orth=True, neumann=None, eps=None):
    """float64 PEFT ``OrthLayer.get_matrix``: ``diag(b) · Cayley(Q) · diag(a)``."""
    w = h.f64(t.weight)
    if not orth:
        rot = w
    else:
        r = int(round((1 + np.sqrt(1 + 8 * w.size)) / 2))
        q = np.zeros((r, r))
        q[np.triu_indices(r, 1)] = w
        q = q - q.T
        eye = np.eye(r)
        if neumann is None:
            rot = (eye + q) @ np.linalg.inv(eye - q)
        else:
            if eps is not None and np.linalg.norm(q) > eps:
                q = q * (eps / (np.linalg.norm(q) + 1e-12))
            rot = eye.copy()  # PEFT's loop, literally (k = 3 and 4 both end at Q³)
            if neumann > 1:
                rot += 2 * q
            if neumann > 2:
                power = q @ q
                rot += 2 * power
                for _ in range(3, neumann - 1):
                    power = power @ q
                    rot += 2 * power
                rot += power @ q
    if t.vector_b is not None:
        rot = h.f64(t.vector_b)[:, None] * rot
    if t.vector_a is not None:
        rot = rot * h.f64(t.vector_a)[None, :]
    return rot


def ref_psoft(w, t, f, scaling=1.0, **kw):
    """float64 ``W0 + scaling · (B (R − I) A)ᵀ`` (Flax layout of PEFT's delta)."""
    rot = _peft_r(t, **kw)
    big_a, big_b = h.f64(f.a).T, h.f64(f.b).T  # PEFT's A (r, in), B (out, r)
    delta = big_b @ (rot - np.eye(rot.shape[0])) @ big_a
    return h.f64(w) + scaling * delta.T


VARIANTS = [
    (dict(), dict()),
    (dict(use_cayley_neumann=True, num_cayley_neumann_terms=5, cayley_neumann_eps=0.5),
     dict(neumann=5, eps=0.5)),
    (dict(orth=False, mag_a=False), dict(orth=False)),
    (dict(init="pissa_init", mag_b=False, use_cayley_neumann=True,
          num_cayley_neumann_terms=3), dict(neumann=3)),
]


@pytest.mark.parametrize("kw,ref_kw", VARIANTS, ids=["cayley", "neumann-eps", "free",
                                                     "pissa-neumann3"])
def test_psoft_is_peft_layer_in_float64(kw, ref_kw):
    rng = np.random.default_rng(0)
    n_in, n_out, r, alpha = 7, 5, 3, 6.0
    w_t = rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((4, n_in))
    # PEFT's _build_psoft_ab_cache_buffers (full SVD), float64
    u, s, vh = np.linalg.svd(w_t, full_matrices=False)
    sc = alpha / r
    with jax.enable_x64(True):
        ad = adapters.psoft(r, alpha=alpha, param_dtype=jnp.float64, **kw)
        t0, f = ad.init(jax.random.key(0), jnp.asarray(w_t.T))
        # the basis is PEFT's up to each singular pair's sign (a float32 SVD, as PEFT's)
        assert f.a.dtype == jnp.float32
        signs = np.sign(np.sum(h.f64(f.a).T * vh[:r], axis=1))
        if kw.get("init") == "pissa_init":
            root = np.sqrt(s[:r] / sc)
            want_a, want_b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        else:
            want_a, want_b = vh[:r], u[:, :r] * (s[:r] / sc)[None, :]
        np.testing.assert_allclose(h.f64(f.a).T, signs[:, None] * want_a, atol=2e-5)
        np.testing.assert_allclose(h.f64(f.b).T, want_b * signs[None, :], atol=2e-5)
        t = jax.tree.map(lambda v: jnp.asarray(v + rng.standard_normal(v.shape) * 0.3), t0)
        want = ref_psoft(w_t.T, t, f, scaling=sc, **ref_kw)
        got = ad.apply(jnp.asarray(w_t.T), t, f)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(got, t, f, None)), w_t.T,
                                   atol=1e-12)
        terms = ad.factored.terms(jnp.asarray(w_t.T), t, f)
        assert terms.in_map is None and terms.in_scale is None
        y = x @ w_t.T + np.asarray(terms.delta(jnp.asarray(x)))
        np.testing.assert_allclose(y, x @ want, atol=1e-12)
        rot = adapters.psoft_rotation(t, orth=kw.get("orth", True),
                                      use_cayley_neumann=kw.get("use_cayley_neumann", False),
                                      num_cayley_neumann_terms=kw.get(
                                          "num_cayley_neumann_terms", 5),
                                      cayley_neumann_eps=kw.get("cayley_neumann_eps"))
        np.testing.assert_allclose(np.asarray(rot), _peft_r(t, **ref_kw), atol=1e-12)


def test_psoft_init_is_identity_and_peft_counts(getkey):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((12, 9)), jnp.float32)
    for kw, count in ((dict(), 6 + 8), (dict(orth=False, mag_a=False), 16 + 4),
                      (dict(mag_a=False, mag_b=False), 6)):
        ad = adapters.psoft(4, **kw)
        t, f = ad.init(getkey(), w)
        assert sum(x.size for x in jax.tree.leaves(t)) == count
        np.testing.assert_array_equal(np.asarray(ad.apply(w, t, f)), np.asarray(w))
        # scaling · a b is the rank-4 principal part of W0 (psoft_init)
        u, s, vh = np.linalg.svd(h.f64(w).T)
        np.testing.assert_allclose(h.f64(f.a) @ h.f64(f.b) * (32.0 / 4),
                                   (u[:, :4] * s[:4] @ vh[:4]).T, **h.MATMUL_F32)
    # init_weights=False: Q ~ N(0, 0.1²), not the identity
    ad = adapters.psoft(4, init_weights=False)
    t, f = ad.init(getkey(), w)
    assert 0.02 < float(jnp.std(t.weight)) < 0.3
    assert float(jnp.abs(ad.apply(w, t, f) - w).max()) > 1e-3


def test_psoft_rotation_stays_orthogonal_after_training():
    # 50 Adam steps of strict PSOFT (exact Cayley, no scales): RᵀR = I in float32, and
    # W' keeps W0's singular values (R acts inside the principal subspace).
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)
    opt = optax.adam(0.05)
    ad = adapters.psoft(4, alpha=4.0, mag_a=False, mag_b=False)
    t, f = ad.init(jax.random.key(0), w)

    def loss(tt):
        return jnp.mean((x @ ad.apply(w, tt, f) - y) ** 2)

    @jax.jit
    def train(t):
        def step(_, carry):
            tt, state = carry
            upd, state = opt.update(jax.grad(loss)(tt), state)
            return optax.apply_updates(tt, upd), state

        with jax.numpy_dtype_promotion("standard"):  # optax mixes int/float
            return jax.lax.fori_loop(0, 50, step, (t, opt.init(t)))[0]

    t_end = train(t)
    assert loss(t_end) < loss(t)
    rot = adapters.psoft_rotation(t_end)
    np.testing.assert_allclose(h.f64(rot.T @ rot), np.eye(4), atol=1e-5)
    assert float(jnp.abs(rot - jnp.eye(4)).max()) > 1e-2  # it moved
    np.testing.assert_allclose(np.linalg.svd(h.f64(ad.apply(w, t_end, f)), compute_uv=False),
                               np.linalg.svd(h.f64(w), compute_uv=False), rtol=1e-5)


def test_psoft_errors():
    with pytest.raises(ValueError, match="psoft"):
        adapters.psoft(0)
    with pytest.raises(ValueError, match="init"):
        adapters.psoft(2, init="svd")
    with pytest.raises(ValueError, match="cayley_neumann_eps"):
        adapters.psoft(2, use_cayley_neumann=True, cayley_neumann_eps=1.5)
    with pytest.raises(ValueError, match="num_cayley_neumann_terms"):
        adapters.psoft(2, num_cayley_neumann_terms=0)
    with pytest.raises(TypeError, match="orth"):
        adapters.psoft(2, orth=1)
    with pytest.raises(ValueError, match=r"rank=4 exceeds min\(in, out\)=3"):
        adapters.psoft(4).init(jax.random.key(0), jnp.ones((3, 5)))
