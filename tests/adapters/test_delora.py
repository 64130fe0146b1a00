"""DeLoRA (peftjax.adapters.delora): PEFT's formula in torch layout, the frozen base
norms, inits, the norm clamp's gradient, the factored form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h


def ref_delora(w, t, f, *, r):
    """float64 ``W0 + diag(w_norm)·a·diag(λ/r/(‖a_:i‖‖b_i:‖))·b`` (norms clamped at 1e-4)."""
    a, b = h.f64(t.a), h.f64(t.b)
    an = np.maximum(np.linalg.norm(a, axis=0), 1e-4)
    bn = np.maximum(np.linalg.norm(b, axis=1), 1e-4)
    c = h.f64(t.boundary) / r / (an * bn)
    return h.f64(w) + (h.f64(f.w_norm)[:, None] * a * c[None, :]) @ b


def _w(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 0.5,
                       jnp.float32)


def test_delora_is_peft_delta_weight_in_float64():
    # PEFT (_compute_delta): An = clamp(‖A[i, :]‖), Bn = clamp(‖B[:, i]‖),
    # ΔW = B @ diag(λ/r/(An·Bn)) @ A * w_norm[None, :], w_norm = ‖W0‖ over dim 0.
    rng = np.random.default_rng(0)
    n_in, n_out, r, lam = 7, 5, 3, 2.5
    w_t = rng.standard_normal((n_out, n_in))
    a_t, b_t = rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))
    w_norm = np.linalg.norm(w_t, axis=0)
    an, bn = np.linalg.norm(a_t, axis=1), np.linalg.norm(b_t, axis=0)
    delta_t = b_t @ np.diag(lam / r / (an * bn)) @ a_t * w_norm[None, :]
    x = rng.standard_normal((4, n_in))
    with jax.enable_x64(True):
        ad = adapters.delora(r, delora_lambda=lam, param_dtype=jnp.float64)
        _, f = ad.init(jax.random.key(0), jnp.asarray(w_t.T))
        np.testing.assert_allclose(np.asarray(f.w_norm), w_norm, rtol=1e-12)
        t = adapters.DeLoRAParams(jnp.asarray(a_t.T), jnp.asarray(b_t.T),
                                  jnp.asarray([lam]))
        got = ad.apply(jnp.asarray(w_t.T), t, f)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), (w_t + delta_t).T, rtol=1e-12,
                                   atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(got, t, f, None)), w_t.T,
                                   rtol=1e-12, atol=1e-12)
        terms = ad.factored.terms(jnp.asarray(w_t.T), t, f)
        y = x @ w_t.T + np.asarray(terms.delta(jnp.asarray(x)))
        np.testing.assert_allclose(y, x @ (w_t + delta_t).T, rtol=1e-12, atol=1e-12)
        # The Frobenius bound of the paper: ‖ΔW‖ <= λ·‖W0‖.
        assert np.linalg.norm(delta_t) <= lam * np.linalg.norm(w_t)


def test_delora_init_is_peft_default(getkey):
    n_in, n_out, r = 64, 48, 4
    w = _w((n_in, n_out))
    t, f = adapters.delora(r).init(getkey(), w)
    np.testing.assert_array_equal(np.asarray(t.b), np.zeros((r, n_out), np.float32))
    np.testing.assert_array_equal(np.asarray(t.boundary), np.asarray([15.0], np.float32))
    a = h.f64(t.a)
    assert np.abs(a).max() <= 1 / np.sqrt(n_in) and np.abs(a).max() > 0.8 / np.sqrt(n_in)
    np.testing.assert_allclose(h.f64(f.w_norm), np.linalg.norm(h.f64(w), axis=1),
                               **h.MATMUL_F32)
    # init_weights=False: B kaiming-uniform too (fan_in = r): not the identity.
    t, _ = adapters.delora(r, init_weights=False).init(getkey(), w)
    b = h.f64(t.b)
    assert np.abs(b).max() <= 1 / np.sqrt(r) and np.abs(b).max() > 0.8 / np.sqrt(r)


def test_delora_gradient_at_init_is_finite_and_only_b_moves(getkey):
    # At init b = 0: ‖b_i‖ is clamped (zero gradient through the clamp, as torch's),
    # so dL/da = dL/dλ = 0 and dL/db = c·(diag(w_norm) a)ᵀ dL/dW' with c = λ/r/(‖a_i‖·1e-4).
    w = _w((6, 5))
    ad = adapters.delora(2, delora_lambda=3.0)
    t, f = ad.init(getkey(), w)
    g_out = _w((6, 5), seed=3)
    g = jax.grad(lambda tt: jnp.sum(ad.apply(w, tt, f) * g_out))(t)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))
    np.testing.assert_array_equal(np.asarray(g.a), np.zeros((6, 2), np.float32))
    np.testing.assert_array_equal(np.asarray(g.boundary), np.zeros((1,), np.float32))
    a = h.f64(t.a)
    c = 3.0 / 2 / (np.linalg.norm(a, axis=0) * 1e-4)
    want = (h.f64(f.w_norm)[:, None] * a * c[None, :]).T @ h.f64(g_out)
    np.testing.assert_allclose(h.f64(g.b), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_delora_bad_arguments():
    with pytest.raises(ValueError, match="rank must be > 0"):
        adapters.delora(0)
    with pytest.raises(ValueError, match="delora_lambda must be a finite number"):
        adapters.delora(2, delora_lambda=float("nan"))
    with pytest.raises(TypeError, match="init_weights must be a bool"):
        adapters.delora(2, init_weights="gaussian")
    with pytest.raises(ValueError, match=r"cannot target a 1-D leaf .*shape \(5,\)"):
        adapters.delora(2).init(jax.random.key(0), jnp.zeros((5,)))
