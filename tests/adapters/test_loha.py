"""LoHa (peftjax.adapters.loha): PEFT's formula and init, in PEFT's torch layout."""

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, tree
from tests import helpers as h


def test_loha_is_peft_delta_weight_in_float64():
    # PEFT: delta (out, in) = (alpha/r)·(w1a@w1b) ⊙ (w2a@w2b), w*a (out, r), w*b (r, in).
    rng = np.random.default_rng(0)
    n_in, n_out, r, alpha = 7, 5, 3, 4.0
    w1a, w2a = rng.standard_normal((n_out, r)), rng.standard_normal((n_out, r))
    w1b, w2b = rng.standard_normal((r, n_in)), rng.standard_normal((r, n_in))
    w = rng.standard_normal((n_in, n_out))
    ref = w + ((alpha / r) * (w1a @ w1b) * (w2a @ w2b)).T
    with jax.enable_x64(True):
        ad = adapters.loha(r, alpha=alpha, param_dtype=jnp.float64)
        t = adapters.LoHaParams(*(jnp.asarray(m.T) for m in (w1b, w1a, w2b, w2a)))
        got = ad.apply(jnp.asarray(w), t, None)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-12, atol=1e-12)
        back = ad.unapply(got, t, None, None)
        np.testing.assert_allclose(np.asarray(back), w, rtol=1e-12, atol=1e-12)


def test_loha_init_is_peft_default(getkey):
    # PEFT init_weights=True: kaiming-uniform(a=sqrt(5)) everywhere (bound 1/sqrt(fan_in),
    # fan_in = the torch factor's second axis), hada_w2_b = 0.
    n_in, n_out, r = 64, 48, 4
    w = jnp.ones((n_in, n_out))
    t, f = adapters.loha(r).init(getkey(), w)
    assert f is None
    np.testing.assert_array_equal(np.asarray(t.a2), np.zeros((n_in, r), np.float32))
    for leaf, bound in ((t.a1, 1 / np.sqrt(n_in)), (t.b1, 1 / np.sqrt(r)),
                        (t.b2, 1 / np.sqrt(r))):
        x = h.f64(leaf)
        assert np.abs(x).max() <= bound and np.abs(x).max() > 0.8 * bound
    assert not np.allclose(h.f64(t.b1), h.f64(t.b2))  # independent draws


def test_loha_stacked_layers_get_independent_factors(getkey):
    params = {"w": jnp.ones((2, 6, 5))}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.loha(2))],
                    layout=tree.stacked("w"))
    t = adapters.init(a, getkey(), params).trainable["w"]
    assert t.a1.shape == (2, 6, 2) and t.b2.shape == (2, 2, 5)
    assert not np.allclose(h.f64(t.a1[0]), h.f64(t.a1[1]))
