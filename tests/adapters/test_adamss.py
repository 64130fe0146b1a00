"""AdaMSS (peftjax.adapters.adamss): PEFT's per-group forward and get_delta_weight in
float64 (ragged groups, padded ranks), the SVD/k-means init, scikit-learn's k-means."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h


def _peft_groups(t, f):
    """PEFT's ragged ``A_i (r_i, q)``, ``B_i (|seg_i|, r_i)`` and ``seg_i`` from peftjax's."""
    a, b = h.f64(t.a), h.f64(t.b)
    labels, mask = np.asarray(f.labels), np.asarray(f.mask)
    out = []
    for i in range(a.shape[0]):
        ri = int(mask[i].sum())
        seg = np.flatnonzero(labels == i)
        out.append((a[i, :ri], b[seg, :ri], seg))
    return out


def ref_adamss(w, t, f):
    """float64 ``W0 + ΔWᵀ``, PEFT's ``ΔW[seg_i] = B_i A_i newB`` (torch ``(out, in)``)."""
    w = h.f64(w)
    newb = h.f64(f.basis).T  # (q, in)
    delta = np.zeros((w.shape[1], w.shape[0]))
    for ai, bi, seg in _peft_groups(t, f):
        delta[seg] = bi @ ai @ newb
    return w + delta.T


def test_adamss_is_peft_forward_in_float64():
    rng = np.random.default_rng(0)
    n_in, n_out, q, k, rk = 7, 9, 4, 3, 2
    labels = np.array([0, 1, 2, 0, 1, 1, 0, 1, 0])  # group 2 has one row: r_2 = 1
    mask = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    w = rng.standard_normal((n_in, n_out))
    x = rng.standard_normal((3, n_in))
    with jax.enable_x64(True):
        ad = adapters.adamss(q, num_subspaces=k, subspace_rank=rk, param_dtype=jnp.float64)
        t = adapters.AdaMSSParams(jnp.asarray(rng.standard_normal((k, rk, q))),
                                  jnp.asarray(rng.standard_normal((n_out, rk))))
        f = adapters.AdaMSSBasis(jnp.asarray(np.linalg.qr(rng.standard_normal((n_in, q)))[0]),
                                 jnp.asarray(labels, jnp.int32), jnp.asarray(mask))
        # PEFT's forward: project, per group F.linear twice, scatter to the outputs
        p = x @ h.f64(f.basis)
        y = np.zeros((3, n_out))
        for ai, bi, seg in _peft_groups(t, f):
            y[:, seg] = (p @ ai.T) @ bi.T
        want = ref_adamss(w, t, f)
        np.testing.assert_allclose(x @ want, x @ w + y, rtol=1e-12, atol=1e-12)
        got = ad.apply(jnp.asarray(w), t, f)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(got, t, f, None)), w, atol=1e-12)
        terms = ad.factored.terms(jnp.asarray(w), t, f)
        assert terms.in_map is None and terms.in_scale is None
        np.testing.assert_allclose(np.asarray(terms.delta(jnp.asarray(x))), y,
                                   rtol=1e-12, atol=1e-12)
        # bias=True: PEFT's newB has the bias column, x' = [x, 1] (get_delta_bias)
        col = rng.standard_normal(q)
        bias0 = rng.standard_normal(n_out)
        fb = f._replace(bias_basis=jnp.asarray(col))
        adb = adapters.adamss(q, num_subspaces=k, subspace_rank=rk, bias=True,
                              param_dtype=jnp.float64)
        want_b = bias0.copy()
        for ai, bi, seg in _peft_groups(t, fb):
            want_b[seg] += bi @ ai @ col
        got_b = adb.bias.apply(w.shape, jnp.asarray(bias0), t, fb)
        np.testing.assert_allclose(np.asarray(got_b), want_b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(adb.bias.unapply(w.shape, got_b, t, fb)),
                                   bias0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(adb.apply(jnp.asarray(w), t, fb)), want,
                                   rtol=1e-12, atol=1e-12)
        # padded ranks get no gradient (they stay zero in training)
        g = jax.grad(lambda tt: jnp.sum(ad.apply(jnp.asarray(w), tt, f) ** 2))(t)
        assert float(jnp.abs(g.a[2, 1]).max()) == 0.0
        assert float(jnp.abs(g.b[2, 1])) == 0.0


def test_adamss_kmeans_is_scikit_learns():
    # KMeans(n_clusters=k, init="random", n_init=1, max_iter=10,
    # random_state=123456789).fit_predict(x) with scikit-learn 1.9.1
    x = np.random.default_rng(5).standard_normal((40, 6)).astype(np.float32)
    want = {3: "2202002202001000021210111201020220102112",
            5: "4404004004301300043413344401242440134114"}
    for k, labels in want.items():
        got = adapters.adamss_kmeans(x, k)
        assert "".join(map(str, got)) == labels
    # invariant to the singular vectors' signs
    flip = x * np.where(np.arange(6) % 2, -1.0, 1.0).astype(np.float32)
    assert "".join(map(str, adapters.adamss_kmeans(flip, 5))) == want[5]
    with pytest.raises(ValueError, match="n_clusters"):
        adapters.adamss_kmeans(x, 41)


def test_adamss_init_is_peft_svd_and_groups(getkey):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((12, 10)), jnp.float32)
    ad = adapters.adamss(6, num_subspaces=3, subspace_rank=2)
    t, f = ad.init(getkey(), w)
    u, s, vh = np.linalg.svd(h.f64(w).T, full_matrices=False)
    basis = h.f64(f.basis)
    # newB = the top 6 right singular vectors of the torch W (up to signs)
    np.testing.assert_allclose(np.abs(basis.T @ vh[:6].T), np.eye(6), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(f.labels),
                                  adapters.adamss_segments(u[:, :6].astype(np.float32), 3))
    for ai, bi, seg in _peft_groups(t, f):
        assert ai.shape[0] == min(seg.size, 2) and np.all(bi == 0)
        # A_i: the top right singular vectors of U[seg_i] (orthonormal rows)
        top = np.linalg.svd(u[seg, :6], full_matrices=False)[2][:ai.shape[0]]
        np.testing.assert_allclose(np.abs(ai @ top.T), np.eye(ai.shape[0]), atol=1e-4)
    assert ad.num_trainable(w) == 3 * 2 * 6 + 10 * 2
    np.testing.assert_array_equal(np.asarray(ad.apply(w, t, f)), np.asarray(w))
    # init_weights=False: B ~ N(0, 0.01²) on the real ranks; dynamic rank drops small ones
    t2, f2 = adapters.adamss(6, num_subspaces=3, subspace_rank=2, init_weights=False,
                             use_dynamic_rank=True, svd_threshold=0.99).init(getkey(), w)
    assert 0 < float(jnp.abs(t2.b).max()) < 0.1
    np.testing.assert_array_equal(np.asarray(f2.mask)[:, 1], 0.0)


def test_adamss_bad_arguments():
    with pytest.raises(ValueError, match="num_subspaces"):
        adapters.adamss(4, num_subspaces=0)
    with pytest.raises(TypeError, match="use_dynamic_rank"):
        adapters.adamss(4, use_dynamic_rank=1)
    with pytest.raises(ValueError, match="subspace_rank=3 exceeds"):
        adapters.adamss(2, subspace_rank=3).init(jax.random.key(0), jnp.ones((4, 5)))


def test_adamss_asa_is_peft_update_and_allocate():
    # PEFT's update_importance (twice) and _global_mask_to_target on ragged groups,
    # in NumPy, against the functional ASA on peftjax's padded layout (one stacked
    # leaf with two layers, one plain leaf).
    rng = np.random.default_rng(3)
    k, rk, q, n_out = 3, 2, 4, 7
    labels = np.array([[0, 1, 2, 0, 1, 1, 0], [2, 2, 0, 1, 0, 1, 2]])
    mask = np.array([[[1, 1], [1, 1], [1, 0]], [[1, 1], [1, 1], [1, 1]]], np.float32)
    frozen = {"s": adapters.AdaMSSBasis(jnp.zeros((2, 5, q)), jnp.asarray(labels),
                                        jnp.asarray(mask)),
              "p": adapters.AdaMSSBasis(jnp.zeros((5, q)), jnp.asarray(labels[0]),
                                        jnp.asarray(mask[0]))}

    def params(lead):
        return adapters.AdaMSSParams(
            jnp.asarray(rng.standard_normal(lead + (k, rk, q)), jnp.float32),
            jnp.asarray(rng.standard_normal(lead + (n_out, rk)), jnp.float32))

    t = {"s": params((2,)), "p": params(())}
    grads = [{"s": params((2,)), "p": params(())} for _ in range(2)]
    state = adapters.adamss_init_importance(t)
    for g in grads:
        state = adapters.adamss_update_importance(state, t, g, beta1=0.8, beta2=0.9)
    new = adapters.adamss_asa_allocate(state, frozen, 4)

    def group(x, li, i, ri, rows):
        """PEFT's ragged (A_i, B_i) of layer ``li`` of a padded AdaMSSParams."""
        a, b = h.f64(x.a), h.f64(x.b)
        if li is not None:
            a, b = a[li], b[li]
        return a[i, :ri], b[rows, :ri]

    scores = []  # PEFT: per (leaf, layer, group), ragged A_i and B_i
    for p, layers in (("s", (0, 1)), ("p", (None,))):
        for li in layers:
            lab, msk = labels[li or 0], mask[li or 0]
            for i in range(k):
                ri, rows = int(msk[i].sum()), lab == i
                score = 0.0
                for part in (0, 1):
                    w = group(t[p], li, i, ri, rows)[part]
                    ipt = unc = 0.0
                    for g in grads:
                        cur = np.abs(w * group(g[p], li, i, ri, rows)[part])
                        unc = 0.9 * unc + 0.1 * np.abs(cur - ipt)
                        ipt = 0.8 * ipt + 0.2 * cur
                    score += (ipt * unc).mean()
                scores.append(score)
    scores = np.array(scores)
    thr = np.sort(scores)[::-1][3]  # torch.kthvalue(-scores, 4)
    want = scores > thr
    got = np.concatenate([np.asarray(new.active["s"]).reshape(-1),
                          np.asarray(new.active["p"]).reshape(-1)])
    np.testing.assert_array_equal(got, want)
    assert got.sum() == 3 and not np.asarray(new.seen["s"]).any()
    # frozen groups: no update moves them; they are never scored again
    upd = adapters.adamss_freeze(grads[0], frozen, new)
    off = ~np.asarray(new.active["p"])
    assert np.all(np.asarray(upd["p"].a)[off] == 0)
    assert np.all(np.asarray(upd["p"].b)[off[labels[0]]] == 0)
    again = adapters.adamss_update_importance(new, t, grads[0])
    assert np.asarray(adapters.adamss_asa_allocate(again, frozen, 1).active["p"])[off].sum() == 0
    assert adapters.adamss_asa_target(60, total=30, target=6, init_warmup=50,
                                      final_warmup=150) == 6 + int(24 * 0.9 ** 3)
