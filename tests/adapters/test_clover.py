"""CLOVER (peftjax.adapters.clover_orthogonalize, clover): the authors' V-O and Q-K pair
orthogonalisation and their ``QKVLinear`` singular-value layer (goldens from
scripts/golden/clover_make.py), function preservation and pruning, the adapter's
per-head SVD, masked pruned directions and its factored output map."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "clover" / "clover_authors.npz"
# one compile per call shape instead of one per eager operation
_orth = jax.jit(adapters.clover_orthogonalize, static_argnames=("head_dim", "rope", "prune"))


def ref_clover(w, t, f):
    """float64 ``W'_h = U_h T_h`` (pruned rows of ``T_h`` masked) on the frozen basis."""
    u, s, tt = h.f64(f.u), h.f64(f.s), h.f64(t.t).copy()
    heads, d = s.shape
    tol = 1e-5 * s.max(axis=1, keepdims=True)
    tt[s <= tol] = 0.0  # pruned directions (rows)
    cols = np.linalg.norm(h.f64(f.v) * s[:, None, :], axis=-1)  # column norms of W_h
    tt.transpose(0, 2, 1)[cols <= tol] = 0.0  # and zero columns
    return np.concatenate([u[:, i * d:(i + 1) * d] @ tt[i] for i in range(heads)], axis=1)


def _signs(mine, theirs):
    """Per-column sign aligning ``mine`` with ``theirs`` (singular vectors' signs)."""
    return np.sign(np.sum(mine * theirs, axis=0))


def test_orthogonalize_matches_authors_pairs():
    g = np.load(GOLDEN)
    d, heads = 3, 2
    # V-O with a v bias (the authors' fine-tuning code: v ↦ U, S apart, o ↦ V)
    v, vb, o = g["vo_v"].T, g["vo_vb"], g["vo_o"].T  # Flax
    q = np.zeros_like(v)
    out = _orth(jnp.asarray(q), jnp.asarray(q), jnp.asarray(v),
                                        jnp.asarray(o), head_dim=d, v_bias=jnp.asarray(vb))
    s = np.concatenate([np.diag(x) for x in g["vo_s"]])  # (heads·d,)
    theirs_v = np.concatenate([g["vo_v_new"].T, g["vo_vb_new"][None]], 0) * s[None, :]
    mine_v = np.concatenate([h.f64(out.v), h.f64(out.v_bias)[None]], 0)
    sign = _signs(mine_v, theirs_v)
    np.testing.assert_allclose(mine_v, theirs_v * sign, atol=2e-5)
    np.testing.assert_allclose(h.f64(out.o), g["vo_o_new"].T * sign[:, None], atol=2e-5)
    # the adapter after the transform, with the authors' trained S: their QKVLinear
    # maps [x, 1] [U; u_b] T_a; ours (x W + b) M_h, M_h = V diag(1/s) T_h, so the
    # authors' T_a (their signs) is M_h = diag(sign/S) T_a here
    ad = adapters.clover(d)
    _, f = ad.init(jax.random.key(0), out.v)
    m = (sign / s).reshape(heads, d)[:, :, None] * g["vo_t"]
    t = adapters.CLOVERParams(jnp.asarray(
        h.f64(f.s)[:, :, None] * np.swapaxes(h.f64(f.v), 1, 2) @ m, jnp.float32))
    y = h.f64(g["vo_x"]) @ h.f64(ad.apply(out.v, t, f)) + h.f64(
        ad.bias.apply(out.v.shape, out.v_bias, t, f))
    np.testing.assert_allclose(y, g["vo_y"], atol=5e-5)
    back = ad.bias.unapply(out.v.shape, ad.bias.apply(out.v.shape, out.v_bias, t, f), t, f)
    np.testing.assert_allclose(h.f64(back), h.f64(out.v_bias), atol=1e-4)
    # the attention output is unchanged: [x, 1] V_aug O per head (summed)
    aug = lambda w, b: np.concatenate([w, b[None]], 0)  # noqa: E731
    np.testing.assert_allclose(aug(h.f64(out.v), h.f64(out.v_bias)) @ h.f64(out.o),
                               aug(v, vb).astype(np.float64) @ o, atol=1e-4)
    # Q-K without RoPE, with biases (the authors' pruning code: U √S, V √S)
    qk = {n: g[f"qk_{n}"] for n in ("q", "qb", "k", "kb", "q_new", "qb_new", "k_new",
                                    "kb_new")}
    out = _orth(
        jnp.asarray(qk["q"].T), jnp.asarray(qk["k"].T), jnp.asarray(qk["q"].T),
        jnp.asarray(qk["q"].T), head_dim=4, q_bias=jnp.asarray(qk["qb"]),
        k_bias=jnp.asarray(qk["kb"]), rope=False)
    mine_q = np.concatenate([h.f64(out.q), h.f64(out.q_bias)[None]], 0)
    mine_k = np.concatenate([h.f64(out.k), h.f64(out.k_bias)[None]], 0)
    theirs_q = np.concatenate([qk["q_new"].T, qk["qb_new"][None]], 0)
    theirs_k = np.concatenate([qk["k_new"].T, qk["kb_new"][None]], 0)
    sign = _signs(mine_q, theirs_q)
    np.testing.assert_allclose(mine_q, theirs_q * sign, atol=5e-5)
    np.testing.assert_allclose(mine_k, theirs_k * sign, atol=5e-5)
    for i in range(heads):  # each head's logits [x,1] Q_h K_hᵀ [x,1]ᵀ unchanged
        c = slice(4 * i, 4 * i + 4)
        before = aug(qk["q"].T, qk["qb"])[:, c].astype(np.float64) @ aug(
            qk["k"].T, qk["kb"])[:, c].T
        np.testing.assert_allclose(mine_q[:, c] @ mine_k[:, c].T, before, atol=1e-4)


def test_adapter_after_orthogonalize_is_authors_qkvlinear():
    g = np.load(GOLDEN)
    d = 3
    v, o = jnp.asarray(g["sv_v"].T), jnp.asarray(g["sv_o"].T)
    out = _orth(v, v, v, o, head_dim=d)
    ad = adapters.clover(d)
    t, f = ad.init(jax.random.key(0), out.v)
    # V_h is a signed identity: T_h = ±diag(S), the authors' singular_value init
    sign = np.sign(np.diagonal(h.f64(t.t), axis1=1, axis2=2))
    np.testing.assert_allclose(h.f64(t.t) * sign[:, :, None], g["sv_s"], atol=2e-5)
    np.testing.assert_allclose(h.f64(ad.apply(out.v, t, f)), h.f64(out.v), atol=1e-5)
    # the authors' trained S (their U's signs -> ours): same outputs
    t = adapters.CLOVERParams(jnp.asarray(g["sv_t"] * sign[:, :, None], jnp.float32))
    y = h.f64(g["sv_x"]) @ h.f64(ad.apply(out.v, t, f))
    np.testing.assert_allclose(y, g["sv_y"], atol=2e-5)
    terms = ad.factored.terms(out.v, t, f)
    y2 = h.f64(terms.out_map(jnp.asarray(g["sv_x"]) @ out.v))
    np.testing.assert_allclose(y2, g["sv_y"], atol=2e-5)


def test_pruning_zeroes_pairs_and_the_adapter_keeps_them_zero(getkey):
    rng = np.random.default_rng(5)
    lay = [jnp.asarray(rng.standard_normal(s), jnp.float32)
           for s in ((2, 12, 8), (2, 12, 8), (2, 12, 8), (2, 8, 12))]  # 2 stacked layers
    out = _orth(*lay, head_dim=4, prune=1, rope=False)
    v = h.f64(out.v).reshape(2, 12, 2, 4)
    assert np.all(v[..., 3] == 0) and np.all(h.f64(out.o).reshape(2, 2, 4, 12)[:, :, 3] == 0)
    assert np.all(h.f64(out.q).reshape(2, 12, 2, 4)[..., 3] == 0)
    norms = np.linalg.norm(v, axis=1)  # orthogonal columns, descending norms (= S)
    assert np.all(np.diff(norms[..., :3], axis=-1) <= 1e-5)

    ad = adapters.clover(4).with_dimension_numbers(tree.dims.stacked())
    t, f = ad.init(getkey(), out.v)
    assert t.t.shape == (2, 2, 4, 4)
    t = jax.tree.map(lambda x: x + 0.5, t)  # the pruned rows/columns of T would move ...
    w2 = h.f64(ad.apply(out.v, t, f)).reshape(2, 12, 2, 4)
    assert np.abs(w2[..., 3]).max() == 0  # ... but stay masked
    np.testing.assert_allclose(h.f64(ad.apply(out.v, t, f)), np.stack(
        [ref_clover(out.v[i], jax.tree.map(lambda x, i=i: x[i], t),
                    jax.tree.map(lambda x, i=i: x[i], f)) for i in range(2)]), atol=1e-4)
    assert ad.num_trainable(out.v) == 2 * 2 * 16
    with pytest.raises(ValueError, match="prune must be"):
        adapters.clover_orthogonalize(*lay, head_dim=4, prune=4)
    with pytest.raises(ValueError, match="head_dim=5 must divide out=8"):
        adapters.clover(5).init(getkey(), lay[0][0])
