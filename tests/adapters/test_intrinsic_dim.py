"""Intrinsic dimension (adapters.intrinsic_dim) and SAID (adapters.said).

Float64 references of the paper's equations with the same draws (the draws
are regenerated from the seed and the matrix index); the Fastfood transform
against an explicit Hadamard matrix and against goldens made with the
authors' math (scripts/golden/said_make.py); the sharing of θ_d.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from peftjax import adapters, tree
from peftjax.adapters import _intrinsic_dim as idim
from tests import helpers as h

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "said", "fastfood.npz")


def _key(f, seed=0):
    return jax.random.fold_in(jax.random.key(seed), f.index)


def _fastfood64(theta, size, bb, perm, gg):
    """``H G Π H B θ`` with explicit float64 Hadamard matrices, normalised."""
    n = len(bb)
    hm = scipy.linalg.hadamard(n).astype(np.float64)
    v = np.zeros(n)
    v[:len(theta)] = theta
    v = hm @ (np.asarray(bb, np.float64) * v)
    v = np.asarray(gg, np.float64) * v[np.asarray(perm)]
    v = (hm @ v)[:size]
    return v / (np.sqrt(n * np.sum(np.asarray(gg, np.float64) ** 2)) * np.sqrt(size / n))


def ref_intrinsic(w, t, f, kind="dense", seed=0):
    """``W + reshape(scale · P_i θ)`` in float64 (P_i from the same draws)."""
    w64 = h.f64(w)
    theta = h.f64(t.theta_d)
    size = w64.size
    if kind == "fastfood":
        bb, perm, gg = idim.fastfood_vars(size, _key(f, seed))
        flat = _fastfood64(theta, size, bb, perm, gg)
    else:
        p = h.f64(idim.projection_matrix(kind, _key(f, seed), size, theta.size,
                                         f.density))
        flat = float(f.scale) * (p @ theta)
    lam = float(t.lam) if hasattr(t, "lam") else 1.0
    return w64 + lam * flat.reshape(w64.shape)


def ref_said(w, t, f):
    return ref_intrinsic(w, t, f, kind="fastfood")


def test_fastfood_matches_the_authors_math():
    """Goldens: the authors' fastfood_torched (torch) on stored B, Π, G, θ."""
    g = np.load(GOLDEN)
    transform = jax.jit(idim.fastfood_transform, static_argnums=1)
    for case in ("a", "b"):
        got = transform(*(jnp.asarray(g[f"{case}_{k}"]) if k != "size"
                          else int(g[f"{case}_size"])
                          for k in ("theta", "size", "bb", "perm", "gg")))
        np.testing.assert_allclose(h.f64(got), g[f"{case}_out"], rtol=1e-5, atol=1e-6)


def test_shared_theta_over_leaves_matches_reference():
    """One θ_d for three matrices (a stacked leaf's layers numbered in turn)."""
    params = {"q": jnp.ones((8, 6)), "v": {"kernel": jnp.ones((2, 8, 4))}}
    ad = adapters.intrinsic_dim(5, seed=3)
    a = tree.assign(params, [tree.Rule(where="q", then=ad),
                             tree.Rule(where="v/kernel",
                                       then=ad.with_dimension_numbers(tree.dims.stacked()))])
    s = jax.jit(lambda k: adapters.init(a, k, params))(jax.random.key(0))
    assert adapters.num_trainable(s.trainable) == 5
    np.testing.assert_array_equal(np.asarray(s.frozen["v/kernel"].index), [1, 2])
    np.testing.assert_allclose(float(s.frozen["q"].scale), (8 * 6 + 2 * 8 * 4) ** -0.5,
                               rtol=1e-6)
    theta = jnp.asarray([0.5, -1.0, 0.3, 2.0, -0.7])
    t = dict(s.trainable)
    t[adapters.SHARED] = {"intrinsic": theta}
    m = jax.jit(lambda t: adapters.materialize(a, params, t, s.frozen))(t)
    want_q = ref_intrinsic(params["q"], adapters.IntrinsicParams(theta), s.frozen["q"],
                           seed=3)
    np.testing.assert_allclose(h.f64(m["q"]), want_q, **h.MATMUL_F32)
    for i in range(2):
        fi = jax.tree.map(lambda x, i=i: x[i], s.frozen["v/kernel"])
        want = ref_intrinsic(params["v"]["kernel"][i], adapters.IntrinsicParams(theta),
                             fi, seed=3)
        np.testing.assert_allclose(h.f64(m["v"]["kernel"][i]), want, **h.MATMUL_F32)


def test_chunked_scan_equals_the_whole_matrix(monkeypatch):
    monkeypatch.setattr(idim, "_BLOCK", 24 * 2)  # 2 columns per chunk, 3 chunks
    w = jnp.zeros((4, 6))
    ad = adapters.unshare(adapters.intrinsic_dim(5, projection="sparse"))
    t, f = jax.jit(ad.init)(jax.random.key(0), w)
    t = t._replace(theta_d=jnp.asarray([1.0, 2.0, -1.0, 0.5, 3.0]))
    np.testing.assert_allclose(h.f64(jax.jit(ad.apply)(w, t, f)), ref_intrinsic(w, t, f, "sparse"),
                               **h.MATMUL_F32)


def test_sparse_and_dense_projection_statistics():
    key = jax.random.key(1)
    rho = 0.1
    p = np.asarray(idim.projection_matrix("sparse", key, 4000, 8, rho))
    np.testing.assert_allclose(np.unique(p), [-rho ** -0.5, 0.0, rho ** -0.5], rtol=1e-6)
    assert abs(np.mean(p != 0) - rho) < 0.02
    assert abs(np.mean(p * p) - 1.0) < 0.1  # unit variance before the 1/√D scale
    d = np.asarray(idim.projection_matrix("dense", key, 4000, 8))
    np.testing.assert_allclose(np.linalg.norm(d / np.sqrt(4000), axis=0), 1.0, atol=0.05)


def test_said_scales_each_matrix_and_counts_one_lambda_each():
    params = {"a": jnp.zeros((4, 4)), "b": {"kernel": jnp.zeros((3, 4, 2))}}
    ad = adapters.said(6)
    a = tree.assign(params, [tree.Rule(where="a", then=ad),
                             tree.Rule(where="b/kernel",
                                       then=ad.with_dimension_numbers(tree.dims.stacked()))])
    s = jax.jit(lambda k: adapters.init(a, k, params))(jax.random.key(0))
    assert adapters.num_trainable(s.trainable) == 6 + 1 + 3  # paper: d includes the λ
    assert s.trainable["b/kernel"].lam.shape == (3,)
    mat = jax.jit(lambda t: adapters.materialize(a, params, t, s.frozen))
    h.assert_tree_allclose(mat(s.trainable), params, **h.EXACT)
    t = dict(s.trainable)
    t[adapters.SHARED] = {"said": jnp.arange(1.0, 7.0)}
    m1 = mat(t)
    t["a"] = t["a"]._replace(lam=jnp.asarray(-2.5))
    m2 = mat(t)
    np.testing.assert_allclose(h.f64(m2["a"]), -2.5 * h.f64(m1["a"]), **h.MATMUL_F32)
    np.testing.assert_array_equal(np.asarray(m2["b"]["kernel"]), np.asarray(m1["b"]["kernel"]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="dimension must be a positive int"):
        adapters.intrinsic_dim(0)
    with pytest.raises(ValueError, match="projection must be one of"):
        adapters.intrinsic_dim(3, projection="gaussian")
    with pytest.raises(ValueError, match="vector must be a non-empty name"):
        adapters.said(3, vector="@x")
    with pytest.raises(ValueError, match=r"dimension=9 exceeds the Fastfood length 8 "
                                         r"of the matrix \(in=2, out=3\)"):
        adapters.said(9).init(jax.random.key(0), jnp.zeros((2, 3)))
