"""SLTrain (peftjax.adapters.sltrain): the authors' SpLoRaLinear forward transcribed in
float64 (torch layout, their (out, in) flat indices), their init, the from-scratch use
(zero base), the factored form and the SmolLM2 count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from peftjax.adapters._sparse import SparseSupport
from tests import helpers as h


def ref_sltrain(w, t, f, *, s):
    """float64 ``W0 + s·a@b`` plus the values scattered at the flat (in, out) positions."""
    w = h.f64(w)
    d = s * h.f64(t.a) @ h.f64(t.b)
    d = d.reshape(-1) + np.bincount(np.asarray(f.indices), h.f64(t.values),
                                    minlength=w.size)
    return w + d.reshape(w.shape)


def _authors_weight(lora_b, lora_a, values, idx_torch, s):
    """float64 of the authors' sparse_linear_forward: W = B@(A·s), scatter_add into (out, in)."""
    wt = lora_b @ (lora_a * s)
    flat = wt.reshape(-1).copy()
    np.add.at(flat, idx_torch, values)
    return flat.reshape(wt.shape)


def test_sltrain_is_authors_forward_in_float64():
    rng = np.random.default_rng(0)
    n_in, n_out, r, alpha = 7, 5, 2, 6.0
    k = int(0.3 * n_in * n_out)
    lora_a = rng.standard_normal((r, n_in))
    lora_b = rng.standard_normal((n_out, r))
    values = rng.standard_normal(k)
    idx_torch = np.sort(rng.permutation(n_in * n_out)[:k])  # positions j·in + i of (out, in)
    w0 = rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((3, n_in))
    want = w0 + _authors_weight(lora_b, lora_a, values, idx_torch, alpha / r)
    # (j, i) of the torch weight is flat i·out + j of the Flax (in, out) kernel.
    j, i = idx_torch // n_in, idx_torch % n_in
    idx_flax = i * n_out + j
    order = np.argsort(idx_flax)
    with jax.enable_x64(True):
        ad = adapters.sltrain(r, alpha=alpha, density=0.3, param_dtype=jnp.float64)
        t = adapters.SLTrainParams(jnp.asarray(lora_a.T), jnp.asarray(lora_b.T),
                                   jnp.asarray(values[order]))
        f = SparseSupport(jnp.asarray(idx_flax[order], jnp.int32))
        got = ad.apply(jnp.asarray(w0.T), t, f)
        np.testing.assert_allclose(np.asarray(got), want.T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(got, t, f, None)), w0.T,
                                   rtol=1e-12, atol=1e-12)
        terms = ad.factored.terms(jnp.asarray(w0.T), t, f)
        y = x @ w0.T + np.asarray(terms.delta(jnp.asarray(x)))
        np.testing.assert_allclose(y, x @ want.T, rtol=1e-12, atol=1e-12)


def test_sltrain_init_follows_authors_and_from_scratch(getkey):
    n_in, n_out = 64, 48
    w = jnp.asarray(np.random.default_rng(1).standard_normal((n_in, n_out)), jnp.float32)
    t, f = adapters.sltrain(4).init(getkey(), w)  # fine-tuning: identity at init
    k = int(0.03 * n_in * n_out)
    idx = np.asarray(f.indices)
    assert idx.dtype == np.int32 and idx.shape == (k,)
    assert np.all(np.diff(idx) > 0) and idx.max() < n_in * n_out
    assert not np.any(np.asarray(t.values)) and not np.any(np.asarray(t.b))
    bound = 1 / np.sqrt(n_in)
    assert 0.8 * bound < np.abs(h.f64(t.a)).max() <= bound
    # Pre-training from scratch: zero base, sparse values U(±1/sqrt(in)), B = 0.
    ad = adapters.sltrain(4, from_scratch=True)
    t, f = ad.init(getkey(), jnp.zeros((n_in, n_out)))
    v = h.f64(t.values)
    assert np.all(v != 0) and 0.8 * bound < np.abs(v).max() <= bound
    t = t._replace(b=jnp.asarray(np.random.default_rng(2).standard_normal((4, n_out)),
                                 jnp.float32))
    got = h.f64(ad.apply(jnp.zeros((n_in, n_out)), t, f))
    low = 8.0 * h.f64(t.a) @ h.f64(t.b)  # s = 32 / 4
    resid = (got - low).reshape(-1)
    off = np.setdiff1d(np.arange(n_in * n_out), np.asarray(f.indices))
    np.testing.assert_allclose(resid[off], 0.0, atol=1e-5)
    np.testing.assert_allclose(resid[np.asarray(f.indices)], v, atol=1e-5)
    assert np.linalg.matrix_rank(low) == 4


def test_sltrain_count_and_errors():
    # SmolLM2-135M q, k, v, o (hidden 576, kv 192) at rank 8, density 0.03
    ad = adapters.sltrain(8)
    n = [ad.num_trainable(jax.ShapeDtypeStruct(s, jnp.float32))
         for s in ((576, 576), (576, 192), (576, 192), (576, 576))]
    assert n == [8 * 1152 + int(0.03 * 576 * 576), 8 * 768 + int(0.03 * 576 * 192),
                 8 * 768 + int(0.03 * 576 * 192), 8 * 1152 + int(0.03 * 576 * 576)]
    with pytest.raises(ValueError, match="density"):
        adapters.sltrain(2, density=1.0)
    with pytest.raises(TypeError, match="from_scratch"):
        adapters.sltrain(2, from_scratch=1)
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        adapters.sltrain(2, density=0.05).init(jax.random.key(0), jnp.zeros((4, 3)))
