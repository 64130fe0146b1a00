"""DeFT (peftjax.adapters.deft): PEFT's get_delta_weight in float64 (relu and qr
projectors, alpha, PaRa), the identity init, the rank cap, unfold from fold's aux,
the factored form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h


def _peft_delta(p, r_mat, w_t, method, s, para):
    """float64 PEFT ``_delta_from_factor(_merge_factor)`` in torch layout ``(out, in)``."""
    if method == "relu":
        q, right = p, np.maximum(p, 0.0)
    else:
        q, _ = np.linalg.qr(p)
        right = q
    m = right.T @ w_t
    return -(q @ m) if para else q @ (s * r_mat - m)


def ref_deft(w, t, f, method="relu", s=1.0):
    """float64 ``W0 + deltaᵀ`` (Flax layout of PEFT's ``W + delta``)."""
    para = t.inject is None
    r_mat = None if para else h.f64(t.inject).T
    return h.f64(w) + _peft_delta(h.f64(t.p), r_mat, h.f64(w).T, method, s, para).T


@pytest.mark.parametrize("method,alpha,para", [("relu", 6.0, False), ("qr", None, False),
                                               ("relu", None, True)])
def test_deft_is_peft_delta_weight_in_float64(method, alpha, para):
    rng = np.random.default_rng(0)
    n_in, n_out, r = 7, 5, 3
    w_t = rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((4, n_in))
    s = alpha / r if alpha else 1.0
    with jax.enable_x64(True):
        ad = adapters.deft(r, decomposition=method, alpha=alpha, para=para,
                           param_dtype=jnp.float64)
        w = jnp.asarray(w_t.T)
        t, f = ad.init(jax.random.key(0), w)
        if not para:  # PEFT's identity init: R = rightᵀ W / s
            np.testing.assert_allclose(np.asarray(ad.apply(w, t, f)), w_t.T, atol=1e-12)
        t = jax.tree.map(lambda v: v + jnp.asarray(rng.standard_normal(v.shape) * 0.3), t)
        want = ref_deft(w_t.T, t, f, method=method, s=s)
        got, aux = ad.apply(w, t, f), ad.fold_aux(w, t, f)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(got, t, f, aux)), w_t.T, atol=1e-12)
        terms = ad.factored.terms(w, t, f)
        y = x @ w_t.T + np.asarray(terms.delta(jnp.asarray(x)))
        np.testing.assert_allclose(y, x @ want, atol=1e-12)


def test_deft_init_counts_and_rank_cap(getkey):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((9, 3)), jnp.float32)
    t, _ = adapters.deft(8).init(getkey(), w)  # r capped at out = 3, as PEFT
    assert (t.p.shape, t.inject.shape) == ((3, 3), (9, 3))
    assert 0.005 < float(jnp.std(t.p)) < 0.05  # N(0, 0.02²)
    t, _ = adapters.deft(2, para=True).init(getkey(), w)
    assert t.inject is None and t.p.shape == (3, 2)
    ad = adapters.deft(2, init_weights=False, init_scale=0.5)
    t, f = ad.init(getkey(), w)
    assert float(jnp.abs(ad.apply(w, t, f) - w).max()) > 1e-4  # not the identity


def test_deft_errors():
    with pytest.raises(ValueError, match="deft"):
        adapters.deft(0)
    with pytest.raises(ValueError, match="decomposition"):
        adapters.deft(2, decomposition="svd")
    with pytest.raises(ValueError, match="alpha"):
        adapters.deft(2, alpha=-1.0)
    with pytest.raises(TypeError, match="para"):
        adapters.deft(2, para=1)
    ad = adapters.deft(2)
    w = jnp.ones((4, 3))
    t, f = ad.init(jax.random.key(0), w)
    with pytest.raises(TypeError, match="aux"):
        ad.unapply(w, t, f, None)
