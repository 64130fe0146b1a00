"""HiRA (peftjax.adapters.hira): PEFT's formula in torch layout, inits, exact unfold,
the r-matmul factored form and its opt-in."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored, tree
from tests import helpers as h


def ref_hira(w, t, f):
    """float64 ``W0 + W0 ⊙ (a@b)`` (the Flax-layout form of PEFT's ``W0 ⊙ (B A)``)."""
    w = h.f64(w)
    return w + w * (h.f64(t.a) @ h.f64(t.b))


def _w(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 0.5,
                       jnp.float32)


def test_hira_is_peft_forward_in_float64():
    # PEFT: y = x W0ᵀ + x (W0 ⊙ (hira_B @ hira_A))ᵀ, W0 (out, in), A (r, in), B (out, r).
    rng = np.random.default_rng(0)
    n_in, n_out, r = 7, 5, 3
    w_t = rng.standard_normal((n_out, n_in))
    a_t, b_t = rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))
    x = rng.standard_normal((4, n_in))
    want = x @ w_t.T + x @ (w_t * (b_t @ a_t)).T
    with jax.enable_x64(True):
        ad = adapters.hira(r, param_dtype=jnp.float64)
        t = adapters.HiRAParams(jnp.asarray(a_t.T), jnp.asarray(b_t.T))
        got = ad.apply(jnp.asarray(w_t.T), t, None)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(x @ np.asarray(got), want, rtol=1e-12, atol=1e-12)
        ad_f = adapters.hira(r, factored_matmuls=True, param_dtype=jnp.float64)
        terms = ad_f.factored.terms(jnp.asarray(w_t.T), t, None)
        y = x @ w_t.T + np.asarray(terms.delta(jnp.asarray(x)))
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_hira_inits_are_peft_defaults(getkey):
    n_in, n_out, r = 64, 48, 4
    w = _w((n_in, n_out))
    # init_weights=True: hira_A kaiming-uniform(a=sqrt(5)) = U(±1/sqrt(in)), hira_B = 0.
    t, f = adapters.hira(r).init(getkey(), w)
    assert f is None
    np.testing.assert_array_equal(np.asarray(t.b), np.zeros((r, n_out), np.float32))
    a = h.f64(t.a)
    assert np.abs(a).max() <= 1 / np.sqrt(n_in) and np.abs(a).max() > 0.8 / np.sqrt(n_in)
    # "gaussian": hira_A ~ N(0, std=1/r), hira_B = 0.
    t, _ = adapters.hira(r, init=adapters.LoRAInit.GAUSSIAN).init(getkey(), w)
    assert abs(h.f64(t.a).std() * r - 1) < 0.15 and not h.f64(t.b).any()
    # Embedding layer: hira_embedding_A = 0, hira_embedding_B ~ N(0, 1).
    t, _ = adapters.hira(r, init=adapters.LoRAInit.EMBEDDING).init(getkey(), w)
    assert not h.f64(t.a).any() and abs(h.f64(t.b).std() - 1) < 0.2
    np.testing.assert_array_equal(np.asarray(adapters.hira(r).apply(w, t, None)),
                                  np.asarray(w))


def test_hira_update_is_high_rank(getkey):
    # rank(W0 ⊙ ab) can exceed r (here r = 1 gives a full-rank 6x5 update).
    w = _w((6, 5))
    t = adapters.HiRAParams(_w((6, 1), seed=1), _w((1, 5), seed=2))
    delta = h.f64(adapters.hira(1).apply(w, t, None)) - h.f64(w)
    assert np.linalg.matrix_rank(delta) == 5


def test_hira_unfold_restores_the_base_exactly(getkey):
    params = {"w": _w((2, 6, 5))}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.hira(2))],
                    layout=tree.stacked("w"))
    state = adapters.init(a, getkey(), params)
    t = state.trainable["w"]
    # 1 + a@b = 0 somewhere: W' is 0 there, so only the saved base brings W0 back.
    b = t.b.at[0, 0, 0].set(-1.0 / t.a[0, 0, 0])
    b = b.at[0, 1:, 0].set(0.0)
    state = state._replace(trainable={"w": t._replace(b=b)})
    merged, aux = adapters.fold(a, params, *state, return_aux=True)
    assert float(merged["w"][0, 0, 0]) == pytest.approx(0.0, abs=1e-6)
    back = adapters.unfold(a, merged, *state, aux=aux)
    np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(params["w"]))
    with pytest.raises(TypeError, match="needs the aux"):
        adapters.unfold(a, merged, *state)


def test_hira_factored_form_is_opt_in(getkey):
    params = {"w": _w((6, 5))}
    x = _w((3, 6), seed=4)
    for ad, n_warn in ((adapters.hira(2), 1), (adapters.hira(2, factored_matmuls=True), 0)):
        a = tree.assign(params, [tree.Rule(where="w", then=ad)])
        state = adapters.init(a, getkey(), params)
        state = state._replace(trainable={"w": adapters.HiRAParams(
            _w((6, 2), seed=5), _w((2, 5), seed=6))})
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            y = factored.transform(lambda p, x: x @ p["w"], a, *state)(params, x)
        fell_back = [r for r in rec if issubclass(r.category, factored.FactoredFallbackWarning)]
        assert len(fell_back) == n_warn
        want = h.f64(x) @ ref_hira(params["w"], state.trainable["w"], None)
        np.testing.assert_allclose(h.f64(y), want, **h.MATMUL_F32)


def test_hira_bad_arguments():
    with pytest.raises(ValueError, match="rank must be > 0"):
        adapters.hira(0)
    with pytest.raises(TypeError, match="init must be a LoRAInit"):
        adapters.hira(2, init="gaussian")
    with pytest.raises(TypeError, match="factored_matmuls must be a bool"):
        adapters.hira(2, factored_matmuls=1)
    with pytest.raises(ValueError, match="dropout=0.1 .* factored_matmuls=True"):
        adapters.hira(2, dropout=0.1)
    with pytest.raises(TypeError, match=r"floating-point .* shape \(6, 5\), dtype int32"):
        adapters.hira(2).init(jax.random.key(0), jnp.zeros((6, 5), jnp.int32))
