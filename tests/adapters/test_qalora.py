"""QA-LoRA (peftjax.adapters.qalora): PEFT's QALoraLinearVariant forward in float64,
the weight-space form (group-constant delta), the factored form, PEFT's init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h


def _peft_forward(x, a_t, b_t, s, g):
    """float64 PEFT ``QALoraLinearVariant.forward`` delta (torch layout factors)."""
    n, n_in = x.shape
    groups = n_in // g
    pooled = x.reshape(n, groups, g).mean(axis=2) * groups
    return pooled @ a_t.T @ b_t.T * s


def ref_qalora(w, t, f, s=2.0, g=1):
    """float64 ``W' = W0 + s·(L/g)·repeat_g(a)@b`` (the matrix of PEFT's forward)."""
    a, b = h.f64(t.a), h.f64(t.b)
    return h.f64(w) + s * (a.shape[0] / g) * np.repeat(a, g, axis=0) @ b


def test_qalora_is_peft_forward_in_float64():
    rng = np.random.default_rng(0)
    n_in, n_out, r, g = 12, 5, 3, 4
    w = rng.standard_normal((n_in, n_out))
    a_t = rng.standard_normal((r, n_in // g))  # PEFT lora_A (r, in/g)
    b_t = rng.standard_normal((n_out, r))
    x = rng.standard_normal((6, n_in))
    want = x @ w + _peft_forward(x, a_t, b_t, 6.0 / r, g)
    with jax.enable_x64(True):
        ad = adapters.qalora(r, group_size=g, alpha=6.0, param_dtype=jnp.float64)
        t = adapters.QALoRAParams(jnp.asarray(a_t.T), jnp.asarray(b_t.T))
        wp = ad.apply(jnp.asarray(w), t, None)
        np.testing.assert_allclose(x @ np.asarray(wp), want, rtol=1e-12, atol=1e-12)
        terms = ad.factored.terms(jnp.asarray(w), t, None)
        y = x @ w + np.asarray(terms.delta(jnp.asarray(x)))
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(wp, t, None, None)), w,
                                   atol=1e-12)
    # The delta is constant within each input group (a group-quantised W0 keeps its grid).
    d = np.asarray(wp) - w
    np.testing.assert_allclose(d.reshape(n_in // g, g, n_out),
                               np.repeat(d[::g][:, None], g, axis=1), atol=1e-12)


def test_qalora_init_count_and_errors(getkey):
    w = jnp.zeros((64, 8))
    ad = adapters.qalora(4, group_size=16)
    t, f = ad.init(getkey(), w)
    assert t.a.shape == (4, 4) and f is None and not np.any(h.f64(t.b))
    assert 0.8 / 2 < np.abs(h.f64(t.a)).max() <= 1 / 2  # torch's U(±1/sqrt(in/g))
    assert ad.num_trainable(w) == 4 * (64 // 16 + 8)
    with pytest.raises(ValueError, match="group_size=16 does not divide in=24"):
        ad.init(getkey(), jnp.zeros((24, 8)))
    with pytest.raises(ValueError, match="group_size"):
        adapters.qalora(4, group_size=0)
