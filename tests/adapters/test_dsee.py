"""DSEE (peftjax.adapters.dsee): the support rules against a float64 transcription
(residual of the rank-r SVD, magnitude, random), the low-rank + sparse update, and the
pruning of the final weights (unstructured and N:M)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h
from tests.adapters.test_sltrain import ref_sltrain


def ref_dsee(w, t, f, *, s):
    """float64 ``W0 + s·(a@b + S2)`` (the authors' BERT forward, Flax layout)."""
    return ref_sltrain(w, t._replace(values=s * h.f64(t.values)), f, s=s)


def test_dsee_support_rules_match_float64(getkey):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 10))
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    resid = w - (u[:, :2] * sv[:2]) @ vt[:2]
    want = np.sort(np.argsort(-np.abs(resid).reshape(-1))[:7])
    wj = jnp.asarray(w, jnp.float32)
    ad = adapters.dsee(2, num_sparse=7)
    t, f = ad.init(getkey(), wj)
    np.testing.assert_array_equal(np.asarray(f.indices), want)
    assert f.indices.dtype == jnp.int32
    assert 0.01 < float(jnp.std(t.a)) < 0.03  # the authors' N(0, 0.02²)
    resid5 = w - (u[:, :5] * sv[:5]) @ vt[:5]  # a decomposition rank apart from the LoRA rank
    got5 = adapters.dsee(2, num_sparse=7, support_rank=5).init(getkey(), wj)[1].indices
    np.testing.assert_array_equal(np.asarray(got5),
                                  np.sort(np.argsort(-np.abs(resid5).reshape(-1))[:7]))
    mag = adapters.dsee_support(wj, 7, rank=2, support="magnitude")
    np.testing.assert_array_equal(np.asarray(mag),
                                  np.sort(np.argsort(-np.abs(w).reshape(-1))[:7]))
    rnd = np.asarray(adapters.dsee_support(wj, 7, rank=2, support="random", key=getkey()))
    assert len(set(rnd.tolist())) == 7 and np.all(np.diff(rnd) > 0)
    it = np.asarray(adapters.dsee(2, num_sparse=7, support_iters=3).init(getkey(), wj)[1]
                    .indices)
    assert it.shape == (7,) and np.all(np.diff(it) > 0)
    # Identity at init; with trained values the update is low rank plus the support only.
    assert bool((ad.apply(wj, t, f) == wj).all())
    t = t._replace(b=jnp.ones_like(t.b), values=jnp.arange(1.0, 8.0))
    got = h.f64(ad.apply(wj, t, f))
    np.testing.assert_allclose(got, ref_dsee(wj, t, f, s=16.0), **h.MATMUL_F32)
    terms = ad.factored.terms(wj, t, f)
    x = jnp.asarray(rng.standard_normal((3, 12)), jnp.float32)
    np.testing.assert_allclose(h.f64(x @ wj) + h.f64(terms.delta(x)), h.f64(x) @ got,
                               **h.MATMUL_F32)


def test_dsee_prune_final_weights():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32)  # stacked
    pruned, mask = adapters.dsee_prune(w, 0.75)
    m = np.asarray(mask)
    assert m.shape == w.shape and np.all(m.reshape(2, -1).sum(1) == 48 - 36)
    for layer in range(2):
        a = np.abs(np.asarray(w[layer])).reshape(-1)
        keep = np.sort(np.argsort(-a)[:12])
        np.testing.assert_array_equal(np.flatnonzero(m[layer].reshape(-1)), keep)
    np.testing.assert_array_equal(np.asarray(pruned), np.where(m, np.asarray(w), 0.0))
    p24, m24 = adapters.dsee_prune(w, n_m=(2, 4))
    assert np.all(np.asarray(m24).reshape(2, 2, 4, 6).sum(axis=2) == 2)
    with pytest.raises(ValueError, match="exactly one"):
        adapters.dsee_prune(w)
    with pytest.raises(ValueError, match="divisible"):
        adapters.dsee_prune(w, n_m=(2, 5))
    with pytest.raises(ValueError, match="support"):
        adapters.dsee(2, support="top")
    with pytest.raises(ValueError, match=r"k=40 .*\(6, 5\)|\(6, 5\).*k=40"):
        adapters.dsee(2, num_sparse=40).init(jax.random.key(0), jnp.zeros((6, 5)))


def test_dsee_count():
    # SmolLM2-135M q, k, v, o at r = 8 and the authors' N = 128
    ad = adapters.dsee(8)
    n = [ad.num_trainable(jax.ShapeDtypeStruct(s, jnp.float32))
         for s in ((576, 576), (576, 192), (576, 192), (576, 576))]
    assert n == [8 * 1152 + 128, 8 * 768 + 128, 8 * 768 + 128, 8 * 1152 + 128]
    with pytest.raises(ValueError, match=r"support_rank=7 .*\(6, 5\)"):
        adapters.dsee(2, num_sparse=3, support_rank=7).init(jax.random.key(0),
                                                            jnp.zeros((6, 5)))
