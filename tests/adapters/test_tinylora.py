"""TinyLoRA (adapters.tinylora): PEFT's formula in float64 from torch-layout
tensors, the SVD basis and projection init, the factored form, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def ref_tinylora(w, t, f):
    """float64 ``W + ΔW_torchᵀ`` with PEFT's ``ΔW_torch = B (Σ v_i P_i) A``.

    The torch tensors are the peftjax ones converted as ``peftjax.io`` does for
    a linear layer: ``tinylora_A = aᵀ (r, in)``, ``tinylora_B = bᵀ (out, r)``,
    ``tinylora_P[i] = P[i]ᵀ``.
    """
    a_t, b_t = h.f64(f.a).T, h.f64(f.b).T
    p_t = h.f64(f.projection).transpose(0, 2, 1)
    r_t = np.einsum("i,ijk->jk", h.f64(t.v), p_t)
    return h.f64(w) + (b_t @ r_t @ a_t).T


def _w(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 0.5,
                       jnp.float32)


def test_svd_basis_projection_and_init(getkey):
    w = _w((7, 5))
    ad = adapters.tinylora(r=3, u=4)
    t, f = ad.init(getkey(), w)
    np.testing.assert_array_equal(np.asarray(t.v), np.zeros(4, np.float32))
    np.testing.assert_array_equal(np.asarray(ad.apply(w, t, f)), np.asarray(w))
    # a = U_r √Σ_r, b = √Σ_r V_rᵀ of the float64 SVD (column signs are free).
    u, s, vt = np.linalg.svd(h.f64(w), full_matrices=False)
    np.testing.assert_allclose(np.abs(h.f64(f.a)), np.abs(u[:, :3] * np.sqrt(s[:3])),
                               **h.MATMUL_F32)
    np.testing.assert_allclose(np.abs(h.f64(f.b)),
                               np.abs(np.sqrt(s[:3])[:, None] * vt[:3]), **h.MATMUL_F32)
    np.testing.assert_allclose(h.f64(f.a) @ h.f64(f.b),
                               (u[:, :3] * s[:3]) @ vt[:3], **h.MATMUL_F32)
    assert f.projection.shape == (4, 3, 3)
    # r is clipped to min(in, out) as PEFT does.
    t2, f2 = adapters.tinylora(r=9, u=2).init(getkey(), w)
    assert f2.a.shape == (7, 5) and f2.projection.shape == (2, 5, 5)
    # N(0, 1/r) projections and the uniform init of v.
    big = adapters.tinylora(r=2, u=4000, uniform_init=True, init_v_bound=0.5)
    tb, fb = big.init(getkey(), w)
    assert abs(float(jnp.std(fb.projection)) - 2**-0.5) < 0.03
    assert float(jnp.max(jnp.abs(tb.v))) <= 0.5 and float(jnp.std(tb.v)) > 0.25


def test_weight_space_factored_and_stacked_match_float64(getkey):
    ad = adapters.tinylora(r=2, u=5, uniform_init=True, init_v_bound=0.4)
    w = _w((8, 6))
    t, f = ad.init(getkey(), w)
    want = ref_tinylora(w, t, f)
    assert np.abs(want - h.f64(w)).max() > 1e-2  # not the identity
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), want, **h.MATMUL_F32)
    x = _w((3, 8), seed=1)
    terms = ad.factored.terms(w, t, f)
    np.testing.assert_allclose(h.f64(x @ w) + h.f64(terms.delta(x)),
                               h.f64(x) @ want, **h.MATMUL_F32)
    st = ad.with_dimension_numbers(tree.dims.stacked())
    ws = _w((2, 8, 6), seed=2)
    ts, fs = st.init(getkey(), ws)
    got = st.apply(ws, ts, fs)
    for i in range(2):
        ti = jax.tree.map(lambda x, i=i: x[i], ts)
        fi = jax.tree.map(lambda x, i=i: x[i], fs)
        np.testing.assert_allclose(h.f64(got[i]), ref_tinylora(ws[i], ti, fi),
                                   **h.MATMUL_F32)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(r=0), ValueError, r"tinylora: r must be a positive int, got 0"),
    (dict(u=-1), ValueError, r"tinylora: u must be a positive int, got -1"),
    (dict(u=2.0), ValueError, r"u must be a positive int, got 2.0"),
    (dict(uniform_init="uniform"), TypeError, r"uniform_init must be a bool"),
    (dict(init_v_bound=-0.1), ValueError, r"init_v_bound must be >= 0"),
    (dict(param_dtype=jnp.int32), TypeError, r"param_dtype must be floating"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        adapters.tinylora(**kwargs)


def test_bad_leaf_names_shape_and_dtype(getkey):
    with pytest.raises(TypeError, match=r"tinylora\(r=2, u=64\).*shape \(4, 3\), dtype int32"):
        adapters.tinylora().init(getkey(), jnp.zeros((4, 3), jnp.int32))


# PEFT 0.21.2's tinylora_v key of each module (in torch's order) on the tiny
# Llama: (number of modules, weight_tying) -> group ids.
PEFT_GROUPS = [
    ((10, 0.5), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]),
    ((6, 0.3), [0, 1, 2, 3, 3, 3]),
    ((4, 1.0), [0, 0, 0, 0]),
    ((14, 0.8), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]),
    ((14, 0.9), [0] * 14),
]


@pytest.mark.parametrize("args,want", PEFT_GROUPS)
def test_weight_tying_groups_are_peft_groups(args, want):
    assert adapters.tinylora_groups(*args).tolist() == want


def test_weight_tying_shares_one_table(getkey):
    """Matrices numbered in assignment order (stacked layers one by one) read
    rows of one trainable table; its gradient sums over them."""
    params = {"a": {"kernel": _w((6, 5))}, "b": {"kernel": _w((3, 6, 5), seed=1)},
              "c": {"kernel": _w((5, 4), seed=2)}}
    ad = adapters.tinylora(2, 3, weight_tying=0.5, uniform_init=True, init_v_bound=0.4)
    a = tree.assign(params, [
        tree.Rule(where="(a|c)/kernel", then=ad),
        tree.Rule(where="b/kernel", then=ad.with_dimension_numbers(tree.dims.stacked()))])
    st = adapters.init(a, getkey(), params)
    table = st.trainable[adapters.SHARED]["tinylora"]
    assert table.shape == (2, 3) and adapters.num_trainable(st.trainable) == 6
    assert st.trainable["a/kernel"].v == adapters.Shared("tinylora")
    # 5 matrices a, b0, b1, b2, c at 0.5: PEFT's groups [0, 0, 1, 1, 1]
    assert [np.asarray(st.frozen[p].group).tolist() for p in ("a/kernel", "b/kernel",
                                                              "c/kernel")] == [0, [0, 1, 1], 1]
    m = adapters.materialize(a, params, *st)
    for p, i, g in (("a", None, 0), ("b", 0, 0), ("b", 2, 1), ("c", None, 1)):
        f = st.frozen[f"{p}/kernel"]
        w = params[p]["kernel"]
        if i is not None:
            w, f = w[i], jax.tree.map(lambda x, i=i: x[i], f)
        t = adapters.TinyLoRAParams(table[g])
        got = m[p]["kernel"] if i is None else m[p]["kernel"][i]
        np.testing.assert_allclose(h.f64(got), ref_tinylora(w, t, f), **h.MATMUL_F32)
    c = {p: _w(np.shape(params[p]["kernel"]), seed=9) for p in params}
    g = jax.grad(lambda tr: sum(jnp.sum(x["kernel"] * c[k]) for k, x in
                                adapters.materialize(a, params, tr, st.frozen).items()))(
        st.trainable)
    assert g[adapters.SHARED]["tinylora"].shape == (2, 3)
    assert float(jnp.abs(g[adapters.SHARED]["tinylora"]).min()) > 0
    with pytest.raises(ValueError, match=r"weight_tying must be in \[0, 1\], got 1.5"):
        adapters.tinylora(weight_tying=1.5)
