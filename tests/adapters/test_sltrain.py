"""SLTrain (peftjax.adapters.sltrain): a golden from the authors' SpLoRaLinear (forward and
gradients; their (out, in) flat indices), their init, the from-scratch use (zero base),
the factored form and the SmolLM2 count."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from peftjax.adapters._sparse import SparseSupport
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).parent / "golden" / "sltrain" / "sltrain.npz"


def ref_sltrain(w, t, f, *, s):
    """float64 ``W0 + s·a@b`` plus the values scattered at the flat (in, out) positions."""
    w = h.f64(w)
    d = s * h.f64(t.a) @ h.f64(t.b)
    d = d.reshape(-1) + np.bincount(np.asarray(f.indices), h.f64(t.values),
                                    minlength=w.size)
    return w + d.reshape(w.shape)


def test_sltrain_matches_authors_code_golden():
    """scripts/golden/sltrain_make.py: the authors' SpLoRaLinear (C++ forward and backward)."""
    g = np.load(GOLDEN)
    n_out, n_in = g["lora_B"].shape[0], g["lora_A"].shape[1]
    idx = g["sparse_index"]  # flat over the torch (out, in) weight: j·in + i
    flax = (idx % n_in) * n_out + idx // n_in  # entry (i, j) of the (in, out) kernel
    order = np.argsort(flax)
    with jax.enable_x64(True):
        ad = adapters.sltrain(2, alpha=4.0, density=0.3, from_scratch=True,
                              param_dtype=jnp.float64)
        t = adapters.SLTrainParams(jnp.asarray(g["lora_A"].T), jnp.asarray(g["lora_B"].T),
                                   jnp.asarray(g["sparse_value"][order]))
        f = SparseSupport(jnp.asarray(flax[order], jnp.int32))
        assert ad.num_trainable(jnp.zeros((n_in, n_out))) == 2 * 12 + idx.size
        zero = jnp.zeros((n_in, n_out), jnp.float64)  # pre-training: no dense base
        x, c = jnp.asarray(g["x"]), jnp.asarray(g["c"])

        def loss(tt):
            return jnp.sum((x @ ad.apply(zero, tt, f)) * c)

        w = ad.apply(zero, t, f)
        np.testing.assert_allclose(np.asarray(x @ w), g["y"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.factored.terms(zero, t, f).delta(x)), g["y"],
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(w, t, f, None)), 0.0, atol=1e-12)
        grad = jax.grad(loss)(t)
        np.testing.assert_allclose(np.asarray(grad.a), g["grad_A"].T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(grad.b), g["grad_B"].T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(grad.values), g["grad_value"][order],
                                   rtol=1e-12, atol=1e-12)


def test_sltrain_init_follows_authors_and_from_scratch(getkey):
    n_in, n_out = 64, 48
    w = jnp.asarray(np.random.default_rng(1).standard_normal((n_in, n_out)), jnp.float32)
    t, f = jax.jit(adapters.sltrain(4).init)(getkey(), w)  # fine-tuning: identity at init
    k = int(0.03 * n_in * n_out)
    idx = np.asarray(f.indices)
    assert idx.dtype == np.int32 and idx.shape == (k,)
    assert np.all(np.diff(idx) > 0) and idx.max() < n_in * n_out
    assert not np.any(np.asarray(t.values)) and not np.any(np.asarray(t.b))
    bound = 1 / np.sqrt(n_in)
    assert 0.8 * bound < np.abs(h.f64(t.a)).max() <= bound
    # Pre-training from scratch: zero base, sparse values U(±1/sqrt(in)), B = 0.
    ad = adapters.sltrain(4, from_scratch=True)
    t, f = jax.jit(ad.init)(getkey(), jnp.zeros((n_in, n_out)))
    v = h.f64(t.values)
    assert np.all(v != 0) and 0.8 * bound < np.abs(v).max() <= bound
    t = t._replace(b=jnp.asarray(np.random.default_rng(2).standard_normal((4, n_out)),
                                 jnp.float32))
    got = h.f64(jax.jit(ad.apply)(jnp.zeros((n_in, n_out)), t, f))
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
    # Any matrix view: a torch-layout (out, in) leaf; the support indexes the (in, out) view.
    tview = adapters.sltrain(2, alpha=4.0, density=0.3, from_scratch=True,
                             dimension_numbers=tree.DimensionNumbers(reduction_axis=1,
                                                                     output_axis=0))
    wt = jnp.zeros((5, 7))
    t, f = jax.jit(tview.init)(jax.random.key(1), wt)
    np.testing.assert_allclose(h.f64(jax.jit(tview.apply)(wt, t, f)),
                               ref_sltrain(wt.T, t, f, s=2.0).T, **h.MATMUL_F32)
    with pytest.raises(ValueError, match="density"):
        adapters.sltrain(2, density=1.0)
    with pytest.raises(TypeError, match="from_scratch"):
        adapters.sltrain(2, from_scratch=1)
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        adapters.sltrain(2, density=0.05).init(jax.random.key(0), jnp.zeros((4, 3)))
