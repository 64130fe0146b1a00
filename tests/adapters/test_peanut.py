"""PEANUT (peftjax.adapters.peanut): PEFT's network in torch layout, its factored form,
inits, exact unfold and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h


def ref_peanut(w, t, f, act=lambda x: np.maximum(x, 0.0), s=1.0):
    """float64 PEANUT on a Flax kernel ``w (in, out)`` (PEFT's ``W0ᵀ``)."""
    w = h.f64(w)
    hid = act(w @ h.f64(t.a))
    res = []
    for e in h.f64(t.encoders):
        res.append(hid)
        hid = act(hid @ e)
    for i, d in enumerate(h.f64(t.decoders)):
        hid = act(hid @ d) + res[-1 - i]
    return w + s * hid @ h.f64(t.b)


def test_peanut_is_peft_forward_in_float64():
    # PEFT, torch layout: d = σ(W0ᵀ Aᵀ); residual encoders/decoders (Linear: h Eᵀ);
    # ΔW = (s · d Bᵀ)ᵀ; y = x W0ᵀ + x ΔWᵀ.
    rng = np.random.default_rng(0)
    n_in, n_out, r, depth, s = 7, 5, 3, 2, 0.7
    w_t = rng.standard_normal((n_out, n_in))
    a_t, b_t = rng.standard_normal((r, n_out)), rng.standard_normal((n_out, r))
    enc = rng.standard_normal((depth, r, r))
    dec = rng.standard_normal((depth, r, r))
    x = rng.standard_normal((4, n_in))
    d = np.tanh(w_t.T @ a_t.T)
    res = []
    for i in range(depth):
        res.append(d)
        d = np.tanh(d @ enc[i].T)
    for i in range(depth):
        d = np.tanh(d @ dec[i].T) + res[depth - 1 - i]
    want = x @ w_t.T + x @ (s * d @ b_t.T)
    with jax.enable_x64(True):
        ad = adapters.peanut(r, depth=depth, act_fn="tanh", scaling=s,
                             param_dtype=jnp.float64)
        t = adapters.PEANUTParams(jnp.asarray(a_t.T), jnp.asarray(enc.transpose(0, 2, 1)),
                                  jnp.asarray(dec.transpose(0, 2, 1)), jnp.asarray(b_t.T))
        got = ad.apply(jnp.asarray(w_t.T), t, None)
        np.testing.assert_allclose(x @ np.asarray(got), want, rtol=1e-12, atol=1e-12)
        terms = ad.factored.terms(jnp.asarray(w_t.T), t, None)
        y = x @ w_t.T + np.asarray(terms.delta(jnp.asarray(x)))
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_peanut_init_unfold_and_errors(getkey):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((6, 8)), jnp.float32)
    ad = adapters.peanut(4, depth=1)
    t, f = ad.init(getkey(), w)
    # PEFT init_weights=True: A, encoders, decoders kaiming-uniform(a=sqrt(5)), B = 0.
    assert not np.asarray(t.b).any() and f is None
    assert 0.8 / np.sqrt(8) < np.abs(np.asarray(t.a)).max() <= 1 / np.sqrt(8)
    assert 0.5 / 2 < np.abs(np.asarray(t.encoders)).max() <= 1 / 2
    np.testing.assert_array_equal(np.asarray(ad.apply(w, t, f)), np.asarray(w))
    t = t._replace(b=jnp.ones_like(t.b))
    folded = ad.apply(w, t, f)
    assert float(jnp.abs(folded - w).max()) > 0.1
    with pytest.raises(TypeError, match="aux"):
        ad.unapply(folded, t, f, None)
    np.testing.assert_array_equal(np.asarray(ad.unapply(folded, t, f, w)), np.asarray(w))
    with pytest.raises(ValueError, match="act_fn='mish'"):
        adapters.peanut(2, act_fn="mish")
    with pytest.raises(ValueError, match="depth"):
        adapters.peanut(2, depth=-1)
    with pytest.raises(TypeError, match="scaling"):
        adapters.peanut(2, scaling="1")
