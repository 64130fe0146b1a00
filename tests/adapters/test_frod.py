"""FRoD (peftjax.adapters.frod): PEFT's basis (both branches) and adapted weight in
float64, the shared group init (W = U diag(λ0) Vᵀ at init), unfold, the factored
term."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def _peft_basis(mats, alpha):
    """float64 PEFT ``_projection_from_weights`` (torch-layout ``W_l (out, in)``)."""
    stacked = np.concatenate(mats, axis=0)
    if stacked.shape[0] < stacked.shape[1]:
        return np.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = np.linalg.qr(stacked)
    t_pi, start = 0.0, 0
    for m in mats:
        q_l = q[start:start + m.shape[0]]
        start += m.shape[0]
        t_pi = t_pi + np.linalg.inv(q_l.T @ q_l + alpha * np.eye(q.shape[1]))
    return r.T @ np.linalg.eigh(t_pi / len(mats))[1]


def peft_u(w, v):
    """float64 PEFT ``_calculate_frod_u_and_lambda``: ``(U (out, in), λ0)``."""
    bi = np.linalg.solve(h.f64(v), h.f64(w)).T  # W V⁻ᵀ with W = wᵀ
    lam0 = np.linalg.norm(bi, axis=0)
    return np.where(lam0 > 1e-12, bi / np.where(lam0 > 1e-12, lam0, 1.0), 0.0), lam0


def ref_frod(w, t, f):
    """float64 PEFT ``U (S + diag λ) Vᵀ`` with the adapter's frozen ``U``, in Flax layout."""
    v, u = h.f64(f.v), h.f64(f.u).T
    idx = np.asarray(f.indices)
    s = np.zeros((v.shape[0],) * 2)
    np.add.at(s, (idx[0], idx[1]), h.f64(t.s_values))
    return (u @ (s + np.diag(h.f64(t.lambda_l))) @ v.T).T


@pytest.mark.parametrize("shapes", [[(3, 5), (1, 5)], [(6, 5), (4, 5)]],
                         ids=["svd", "qr"])
def test_frod_basis_is_peft_projection_in_float64(shapes):
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal(s) for s in shapes]
    with jax.enable_x64(True):
        got = np.asarray(adapters.frod_basis([jnp.asarray(m) for m in mats], 1e-3))
    want = _peft_basis(mats, 1e-3)
    signs = np.sign(np.sum(got * want, axis=0))  # eigen/singular vectors: up to sign
    np.testing.assert_allclose(got, want * signs, rtol=1e-9, atol=1e-9)


def test_frod_is_peft_weight_and_unfolds_in_float64():
    rng = np.random.default_rng(1)
    n_in, n_out = 7, 5
    w = rng.standard_normal((n_in, n_out))
    x = rng.standard_normal((4, n_in))
    with jax.enable_x64(True):
        ad = adapters.unshare(adapters.frod(0.2, param_dtype=jnp.float64))
        t, f = ad.init(jax.random.key(0), jnp.asarray(w))
        assert t.s_values.shape == (adapters.frod_nnz(n_in, 0.2),) == (9,)
        u, lam0 = peft_u(w, f.v)
        np.testing.assert_allclose(np.asarray(f.u), u.T, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(f.lambda0), lam0, rtol=1e-10)
        np.testing.assert_array_equal(np.asarray(t.lambda_l), np.asarray(f.lambda0))
        idx = np.asarray(f.indices)
        assert (idx[0] != idx[1]).all() and len(set(zip(*idx, strict=True))) == 9
        # At init S = 0 and λ = λ0: W = U diag(λ0) Vᵀ.
        np.testing.assert_allclose(np.asarray(ad.apply(jnp.asarray(w), t, f)), w,
                                   rtol=1e-10, atol=1e-10)
        t = t._replace(lambda_l=t.lambda_l + jnp.asarray(rng.standard_normal(n_in)) * 0.3,
                       s_values=jnp.asarray(rng.standard_normal(9)) * 0.3)
        want = ref_frod(w, t, f)
        got = ad.apply(jnp.asarray(w), t, f)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(ad.unapply(got, t, f, None)), w,
                                   rtol=1e-9, atol=1e-9)
        terms = ad.factored.terms(jnp.asarray(w), t, f)
        assert terms.in_map is None and terms.out_scale is None
        y = x @ w + np.asarray(terms.delta(jnp.asarray(x)))
        np.testing.assert_allclose(y, x @ want, rtol=1e-9, atol=1e-9)


def test_frod_group_shares_one_basis_over_stacked_and_unrolled_leaves(getkey):
    rng = np.random.default_rng(2)
    params = {"s": jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32),
              "u": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
              "o": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)}
    ad = adapters.frod(0.1, group="role")
    a = tree.assign(params, [tree.Rule(where="s", then=ad), tree.Rule(where="u", then=ad)],
                    layout=tree.stacked("s"))
    st = adapters.init(a, getkey(), params)
    v = st.frozen["@shared"]["role/V"]
    mats = [h.f64(params["s"][0]).T, h.f64(params["s"][1]).T, h.f64(params["u"]).T]
    want = _peft_basis(mats, 1e-3)
    np.testing.assert_allclose(h.f64(v) * np.sign(np.sum(h.f64(v) * want, axis=0)), want,
                               rtol=2e-4, atol=2e-4)
    assert adapters.num_trainable(st.trainable) == 3 * (6 + 3)
    m = jax.jit(lambda t, f: adapters.materialize(a, params, t, f))(*st)
    h.assert_tree_allclose(m, params, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="differ in their input size"):
        adapters.init({"u": ad, "o": ad}, getkey(), params)
