"""RoseLoRA (peftjax.adapters.roselora): the thresholding step against numpy, the cubic
schedule, and training through roselora_sparsify (row-sparse A, column-sparse B, so a
sparse BA; the importance EMA)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import adapters
from tests import helpers as h


def _np_keep_top(x, score, k, axis):
    out = np.zeros_like(x)
    idx = np.argsort(-score, axis=axis, kind="stable")
    idx = np.take(idx, np.arange(k), axis=axis)
    np.put_along_axis(out, idx, np.take_along_axis(x, idx, axis=axis), axis=axis)
    return out


def test_roselora_project_and_schedule_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((9, 3)), rng.standard_normal((3, 7))
    sa, sb = rng.random((9, 3)), rng.random((3, 7))
    t = adapters.RoseLoRAParams(jnp.asarray(a), jnp.asarray(b))
    sc = adapters.RoseLoRAParams(jnp.asarray(sa), jnp.asarray(sb))
    got = adapters.roselora_project({"q": t, "x": jnp.ones(2)}, 0.4, {"q": sc, "x": jnp.ones(2)})
    np.testing.assert_allclose(h.f64(got["q"].a), _np_keep_top(a, sa, 4, 0), rtol=1e-6)
    np.testing.assert_allclose(h.f64(got["q"].b), _np_keep_top(b, sb, 3, 1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["x"]), np.ones(2))
    steps = np.arange(0, 21)
    tau, ti, tf, total = 0.25, 4, 6, 20
    want = np.where(steps <= ti, 1.0, np.where(
        steps > total - tf, tau, tau + (1 - tau) * (1 - (steps - ti) / (total - ti - tf)) ** 3))
    got = [float(adapters.roselora_keep(s, density=tau, total_steps=total, warmup_steps=ti,
                                        final_steps=tf)) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_roselora_training_gives_sparse_factors_and_update(getkey):
    rng = np.random.default_rng(1)
    n_in, n_out, r = 16, 12, 4
    w = jnp.asarray(rng.standard_normal((n_in, n_out)) * 0.3, jnp.float32)
    ad = adapters.roselora(r, alpha=8.0)
    t, f = ad.init(getkey(), w)
    x = jnp.asarray(rng.standard_normal((32, n_in)), jnp.float32)
    y = x @ (w + 0.5 * jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.float32))
    total, tau, beta = 12, 0.25, 0.85
    opt = adapters.roselora_sparsify(optax.adam(0.05), density=tau, total_steps=total,
                                     warmup_steps=2, final_steps=4, beta=beta)
    state = opt.init(t)

    def loss(tt):
        return jnp.mean((x @ ad.apply(w, tt, f) - y) ** 2)

    @jax.jit
    def step(t, state):
        value, g = jax.value_and_grad(loss)(t)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int/float
            u, state = opt.update(g, state, t)
            return optax.apply_updates(t, u), state, value, g

    t0 = t
    t, state, first, g0 = step(t, state)
    # The importance EMA after one step: (1 - beta)·|θ·g|.
    np.testing.assert_allclose(h.f64(state.importance.a),
                               (1 - beta) * np.abs(h.f64(t0.a) * h.f64(g0.a)), rtol=1e-5)
    losses = [float(first)]
    for _ in range(total - 1):
        t, state, value, _ = step(t, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    a, b = h.f64(t.a), h.f64(t.b)
    assert np.all((a != 0).sum(axis=0) <= int(np.ceil(tau * n_in)))  # rows of A
    assert np.all((b != 0).sum(axis=1) <= int(np.ceil(tau * n_out)))  # columns of B
    delta = a @ b
    assert 0 < np.count_nonzero(delta) <= r * int(np.ceil(tau * n_in)) * int(np.ceil(tau * n_out))
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), h.f64(w) + 2.0 * delta,
                               **h.MATMUL_F32)
