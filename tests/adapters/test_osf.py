"""OSF adapter (PEFT ``tuners/osf``): float64 reference, PEFT's numbers and gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h


def ref_osf(w, t, f):
    """float64 ``W0 + v diag(s) u − v⁰ diag(s⁰) u⁰``."""
    cur = h.f64(t.v) * h.f64(t.s)[None, :] @ h.f64(t.u)
    init = h.f64(f.v0) * h.f64(f.s0)[None, :] @ h.f64(f.u0)
    return h.f64(w) + cur - init


def test_osf_is_peft_layer_with_projected_gradients():
    # PEFT (decompose_weight_matrix, get_delta_weight, the U_low / V_low hooks) in torch
    # layout W (out, in) = U S Vt; k preserved, U_low = U[:, k:], V_low = Vt[k:, :].
    rng = np.random.default_rng(0)
    n_out, n_in, k = 5, 7, 2
    w_t = rng.standard_normal((n_out, n_in))
    u_, s_, vt = np.linalg.svd(w_t, full_matrices=False)
    ad = adapters.osf(k, param_dtype=np.float64)
    with jax.enable_x64(True):
        w = jnp.asarray(w_t.T)
        t, f = ad.init(jax.random.key(0), w)
        # trainable count r·(in + out + 1), PEFT's (U_low, S_low, V_low)
        assert (t.v.shape, t.s.shape, t.u.shape) == ((n_in, 3), (3,), (3, n_out))
        np.testing.assert_allclose(np.asarray(f.s0), s_[k:], rtol=1e-12)
        # trained factors (PEFT's torch tensors) give PEFT's delta
        u_low = rng.standard_normal((n_out, 3))
        s_low = rng.standard_normal(3)
        v_low = rng.standard_normal((3, n_in))
        delta_t = (u_low * s_low) @ v_low - (u_[:, k:] * s_[k:]) @ vt[k:]
        tt = adapters.OSFParams(jnp.asarray(v_low.T), jnp.asarray(s_low), jnp.asarray(u_low.T))
        np.testing.assert_allclose(np.asarray(ad.apply(w, tt, f)), w_t.T + delta_t.T,
                                   rtol=1e-10, atol=1e-10)
        # gradients: PEFT's hooks project dU_low off U_high and dV_low off V_high
        c = rng.standard_normal((n_in, n_out))
        g = jax.grad(lambda p: jnp.sum(ad.apply(w, p, f) * c))(tt)
        d_delta = c.T  # dL/dΔW_torch
        du = d_delta @ (v_low.T * s_low)  # (out, r)
        dv = (u_low * s_low).T @ d_delta  # (r, in)
        uh, vh = u_[:, :k], vt[:k]
        du_p = du - uh @ (uh.T @ du)
        dv_p = dv - (dv @ vh.T) @ vh
        np.testing.assert_allclose(np.asarray(g.u), du_p.T, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(g.v), dv_p.T, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(g.s), np.einsum("or,ri,oi->r", u_low, v_low,
                                                              d_delta), rtol=1e-10)
        assert np.abs(du - du_p).max() > 1e-3  # the projection does something


def test_osf_rank_rule_and_errors():
    assert adapters.osf_rank(None, 16, 8) == 4
    assert adapters.osf_rank(0.5, 16, 8) == 4
    assert adapters.osf_rank(20, 16, 8) == 8
    t, _ = adapters.osf(0.25).init(jax.random.key(0), jnp.ones((16, 8)))
    assert t.s.shape == (6,)
    with pytest.raises(ValueError, match="effective_rank must be positive"):
        adapters.osf(0)
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        adapters.osf(1.5)
    with pytest.raises(TypeError, match="effective_rank"):
        adapters.osf("4")
    with pytest.raises(TypeError, match="init_weights"):
        adapters.osf(2, init_weights=1)
