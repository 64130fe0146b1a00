"""VectorFit (peftjax.adapters.vectorfit): a float64 transcription of the paper's
reparametrisation (no authors' code exists) and its invariants (singular values shift,
singular vectors fixed, a full-rank ΔW), the bias vector through fold/unfold, and
Adaptive Vector Freezing (selection and the optax transform)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def ref_vectorfit(w, t, f):
    """float64 ``W + U diag(δ_Σ) Vᵀ`` (kernel layout)."""
    return h.f64(w) + (h.f64(f.u) * h.f64(t.delta_s)[None, :]) @ h.f64(f.vt)


def test_vectorfit_is_the_papers_reparametrisation_in_float64():
    # Torch layout W (out, in) = U Σ Vᵀ; the paper trains Σ: W' = U (Σ + ΔΣ) Vᵀ.
    rng = np.random.default_rng(0)
    w_t = rng.standard_normal((5, 7))
    u, s, vt = np.linalg.svd(w_t, full_matrices=False)
    ds = np.array([0.5, 0.4, 0.3, 0.2, 0.1])
    want = u @ np.diag(s + ds) @ vt  # (out, in)
    with jax.enable_x64(True):
        ad = adapters.vectorfit(param_dtype=jnp.float64)
        k = jnp.asarray(w_t.T)

        @jax.jit
        def run(k, ds, x):
            t, f = ad.init(jax.random.key(0), k)
            t = t._replace(delta_s=ds)
            got = ad.apply(k, t, f)
            return t, f, got, x @ k + ad.factored.terms(k, t, f).delta(x)

        x = rng.standard_normal((3, 7))
        t, f, got, y = jax.tree.map(np.asarray, run(k, jnp.asarray(ds), jnp.asarray(x)))
    np.testing.assert_allclose(got, want.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, x @ want.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f.singular_values, s, rtol=1e-12)
    # The singular vectors are W's; ΔW = U ΔΣ Vᵀ has full rank min(in, out).
    u2, s2, vt2 = np.linalg.svd(got, full_matrices=False)
    np.testing.assert_allclose(s2, s + ds, rtol=1e-12)
    np.testing.assert_allclose(np.abs(u2.T @ f.u), np.eye(5), atol=1e-10)
    assert np.linalg.matrix_rank(got - w_t.T) == 5
    assert adapters.vectorfit().num_trainable(k) == 5


def test_vectorfit_trains_the_bias_vector(getkey):
    params = {"lin": {"kernel": jnp.asarray(np.random.default_rng(1).standard_normal((6, 4)),
                                            jnp.float32),
                      "bias": jnp.asarray([0.1, 0.2, 0.3, 0.4], jnp.float32)}}
    a = tree.assign(params, [tree.Rule(where="lin/kernel",
                                       then=adapters.vectorfit(train_bias=True))])
    state = adapters.init(a, getkey(), params)
    t = state.trainable["lin/kernel"]
    assert t.delta_b.shape == (4,) and adapters.num_trainable(state.trainable) == 4 + 4
    t = t._replace(delta_b=jnp.asarray([1.0, -1.0, 0.5, 0.0]))
    trainable = {"lin/kernel": t}
    merged = adapters.fold(a, params, trainable, state.frozen)
    np.testing.assert_allclose(h.f64(merged["lin"]["bias"]), [1.1, -0.8, 0.8, 0.4], rtol=1e-6)
    back = adapters.unfold(a, merged, trainable, state.frozen)
    h.assert_tree_allclose(back, params, **h.MATMUL_F32)
    # The bias is required: a kernel without one is refused.
    with pytest.raises(ValueError, match="bias"):
        a2 = tree.assign({"k": params["lin"]["kernel"]},
                         [tree.Rule(where="k", then=adapters.vectorfit(train_bias=True))])
        adapters.init(a2, getkey(), {"k": params["lin"]["kernel"]})


def _ref_mask(vectors, k):
    """float64 AVF: freeze the k vectors of largest ‖δ‖₁."""
    strength = np.array([np.abs(v).sum() for v in vectors])
    frozen = np.argsort(-strength, kind="stable")[:k]
    return [0.0 if i in frozen else 1.0 for i in range(len(vectors))]


def test_vectorfit_avf_freezes_the_strongest_vectors():
    rng = np.random.default_rng(2)
    # Stacked (2 layers) singular-value vectors plus a bias, and a plain matrix.
    q = adapters.VectorFitParams(jnp.asarray(rng.standard_normal((2, 4)), jnp.float32),
                                 jnp.asarray(rng.standard_normal((2, 3)), jnp.float32))
    v = adapters.VectorFitParams(jnp.asarray(rng.standard_normal(5), jnp.float32))
    t = {"q": q, "v": v, "other": jnp.ones((2, 2))}
    vectors = [h.f64(q.delta_s[0]), h.f64(q.delta_s[1]), h.f64(q.delta_b[0]),
               h.f64(q.delta_b[1]), h.f64(v.delta_s)]
    mask = jax.jit(adapters.vectorfit_avf_mask, static_argnums=1)
    for k in (2, 5):
        m = mask(t, k)
        got = [float(m["q"].delta_s[0, 0]), float(m["q"].delta_s[1, 0]),
               float(m["q"].delta_b[0, 0]), float(m["q"].delta_b[1, 0]),
               float(m["v"].delta_s[0])]
        assert got == _ref_mask(vectors, k)
        assert m["q"].delta_s.shape == (2, 4) and m["v"].delta_b is None
        np.testing.assert_array_equal(np.asarray(m["other"]), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"num_frozen must be an int in \[0, 5\]"):
        adapters.vectorfit_avf_mask(t, 6)


def test_vectorfit_avf_transform_holds_frozen_vectors_for_a_period():
    # sgd(1) with constant gradients: every vector moves by -g per update unless frozen.
    p = {"a": adapters.VectorFitParams(jnp.zeros(2)),
         "b": adapters.VectorFitParams(jnp.zeros(2)),
         "c": adapters.VectorFitParams(jnp.zeros(2))}
    g = {"a": adapters.VectorFitParams(-1.0 * jnp.ones(2)),
         "b": adapters.VectorFitParams(-2.0 * jnp.ones(2)),
         "c": adapters.VectorFitParams(-3.0 * jnp.ones(2))}
    opt = optax.chain(optax.sgd(1.0), adapters.vectorfit_avf(1, every=2))
    state = opt.init(p)

    @jax.jit
    def step(p, state):
        u, state = opt.update(g, state, p)
        return optax.apply_updates(p, u), state

    trace = []
    for _ in range(6):
        p, state = step(p, state)
        trace.append([float(p[n].delta_s[0]) for n in "abc"])
    # Updates 0-1 free; at 2, "c" (‖δ‖₁ = 12) freezes for 2 updates; at 4, "b" (16 > 12)
    # freezes and "c" is released: strength is the L1 distance from init.
    assert trace == [[1, 2, 3], [2, 4, 6], [3, 6, 6], [4, 8, 6], [5, 8, 9], [6, 8, 12]]
    with pytest.raises(ValueError, match="every"):
        adapters.vectorfit_avf(1, every=0)
