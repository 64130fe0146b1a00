"""Sparse delta adapter (issue 7, item 1 and 5; docs/methods.md#sparse-deltas)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def _w(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def test_indices_unique_sorted_in_range_and_per_layer(getkey):
    ad = adapters.sparse_delta(0.25, dimension_numbers=tree.dims.stacked())
    t, f = ad.init(getkey(), _w((4, 8, 6)))
    assert f.indices.shape == t.values.shape == (4, 12)
    assert f.indices.dtype == jnp.int32
    idx = np.asarray(f.indices)
    for row in idx:
        assert len(set(row.tolist())) == 12
        assert (np.diff(row) > 0).all() and row.min() >= 0 and row.max() < 48
    assert len({tuple(r) for r in idx}) > 1  # layers draw independent supports


def test_folded_differs_only_at_indices_and_unfold_is_exact(getkey):
    ad = adapters.sparse_delta(k=7)
    w = _w((5, 6))
    t, f = ad.init(getkey(), w)
    t = adapters.SparseValues(_w((7,), seed=2))
    merged = ad.apply(w, t, f)
    diff = np.asarray(merged != w).reshape(-1)
    mask = np.zeros(30, bool)
    mask[np.asarray(f.indices)] = True
    np.testing.assert_array_equal(diff, mask)
    np.testing.assert_allclose(h.f64(merged).reshape(-1)[np.asarray(f.indices)],
                               h.f64(w).reshape(-1)[np.asarray(f.indices)]
                               + h.f64(t.values), **h.ELEMENTWISE_F32)
    back = ad.unapply(merged, t, f, None)
    np.testing.assert_allclose(h.f64(back), h.f64(w), **h.ELEMENTWISE_F32)


def test_gradient_is_dense_gradient_gathered_at_indices(getkey):
    ad = adapters.sparse_delta(k=9)
    w = _w((4, 5))
    t, f = ad.init(getkey(), w)
    c = _w((4, 5), seed=3)
    g = jax.grad(lambda tt: jnp.sum(ad.apply(w, tt, f) ** 2 * c))(t)
    dense = 2 * h.f64(w) * h.f64(c)
    np.testing.assert_allclose(h.f64(g.values),
                               dense.reshape(-1)[np.asarray(f.indices)], **h.MATMUL_F32)


def test_head_split_view_keeps_leaf_order_and_reordering_view_raises(getkey):
    dims = tree.DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    ad = adapters.sparse_delta(k=5, dimension_numbers=dims)
    w = _w((6, 2, 4))
    t, f = ad.init(getkey(), w)
    t = adapters.SparseValues(jnp.arange(1.0, 6.0))
    got = h.f64(ad.apply(w, t, f)).reshape(-1) - h.f64(w).reshape(-1)
    want = np.zeros(48)
    want[np.asarray(f.indices)] = np.arange(1.0, 6.0)
    np.testing.assert_allclose(got, want, **h.ELEMENTWISE_F32)
    transposed = tree.DimensionNumbers(reduction_axis=1, output_axis=0)
    with pytest.raises(ValueError, match=r"shape \(6, 4\) reorders axes"):
        adapters.sparse_delta(k=3, dimension_numbers=transposed).init(
            getkey(), _w((6, 4)))


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval_raises(density):
    with pytest.raises(ValueError, match=f"density must be in \\(0, 1\\], got density={density}"):
        adapters.sparse_delta(density)


def test_k_errors(getkey):
    with pytest.raises(ValueError, match="exactly one of density and k"):
        adapters.sparse_delta()
    with pytest.raises(ValueError, match="exactly one of density and k"):
        adapters.sparse_delta(0.1, k=3)
    too_big = r"k=31 is larger than the matrix \(30 entries\).*\(5, 6\)|shape \(5, 6\).*k=31"
    with pytest.raises(ValueError, match=too_big):
        adapters.sparse_delta(k=31).init(getkey(), _w((5, 6)))
    with pytest.raises(ValueError, match=r"gives k=0"):
        adapters.sparse_delta(0.01).init(getkey(), _w((5, 6)))
    with pytest.raises(TypeError, match="k must be a positive int"):
        adapters.sparse_delta(k=2.0)


def test_compact_roundtrip_and_merge(getkey):
    params = {"a": {"kernel": _w((6, 5))}, "s": {"kernel": _w((3, 4, 4), seed=1)}}
    a = tree.assign(params, [tree.Rule(where=r".*kernel", then=adapters.sparse_delta(0.25))],
                    layout=tree.stacked("s"))
    st = adapters.init(a, getkey(), params)
    st = st._replace(trainable={p: adapters.SparseValues(_w(v.values.shape, seed=5))
                                for p, v in st.trainable.items()})
    compact = adapters.sparse_to_compact(*st)
    assert compact["s/kernel/indices"].shape == (3, 4)
    a2, st2 = adapters.sparse_from_compact(compact, params)
    h.assert_tree_allclose(adapters.fold(a2, params, *st2),
                           adapters.fold(a, params, *st), **h.EXACT)


@pytest.mark.parametrize("bad,match", [
    (np.array([0, 30], np.int32), r"'w'.*\(5, 6\).*index 30 is out of range \[0, 30\)"),
    (np.array([-1, 3], np.int32), r"index -1 is out of range"),
    (np.array([4, 4], np.int32), r"'w'.*duplicate index 4"),
    (np.array([1.0, 2.0]), r"indices must be integers, got dtype float64"),
])
def test_loading_bad_indices_raises(bad, match):
    params = {"w": _w((5, 6))}
    with pytest.raises(ValueError, match=match):
        adapters.sparse_from_compact(
            {"w/indices": bad, "w/values": np.ones(2, np.float32)}, params)


def test_loading_shape_mismatch_raises():
    params = {"w": _w((2, 5, 6))}
    with pytest.raises(ValueError, match="does not match the leaf's leading"):
        adapters.sparse_from_compact({"w/indices": np.zeros((3, 2), np.int32),
                                      "w/values": np.zeros((3, 2), np.float32)}, params)
    with pytest.raises(ValueError, match="needs both"):
        adapters.sparse_from_compact({"w/indices": np.zeros(2, np.int32)}, params)


def test_composition_add_sparse_and_lora_then_subtract_one(getkey):
    """Composable SFT: deltas add onto one base; unmerging one removes it exactly."""
    params = {"w": _w((6, 5))}
    rule = [tree.Rule(where="w", then=adapters.sparse_delta(0.3))]
    a1 = tree.assign(params, rule)
    a2 = tree.assign(params, rule)
    al = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
    s1 = adapters.init(a1, jax.random.key(1), params)
    s2 = adapters.init(a2, jax.random.key(2), params)
    sl = adapters.init(al, jax.random.key(3), params)
    s1 = s1._replace(trainable={"w": adapters.SparseValues(_w((9,), seed=7))})
    s2 = s2._replace(trainable={"w": adapters.SparseValues(_w((9,), seed=8))})
    sl = sl._replace(trainable={"w": adapters.LoRAParams(_w((6, 2), seed=9),
                                                         _w((2, 5), seed=10))})
    composed = params
    for a, s in ((a1, s1), (a2, s2), (al, sl)):
        composed = adapters.fold(a, composed, *s)
    d = np.zeros(30)
    for s in (s1, s2):
        np.add.at(d, np.asarray(s.frozen["w"].indices), h.f64(s.trainable["w"].values))
    lora = 4.0 * h.f64(sl.trainable["w"].a) @ h.f64(sl.trainable["w"].b)
    np.testing.assert_allclose(h.f64(composed["w"]),
                               h.f64(params["w"]) + d.reshape(6, 5) + lora, **h.MATMUL_F32)
    minus1 = adapters.unfold(a1, composed, *s1)
    only = adapters.fold(al, adapters.fold(a2, params, *s2), *sl)
    np.testing.assert_allclose(h.f64(minus1["w"]), h.f64(only["w"]), **h.MATMUL_F32)


def test_density_one_equals_dense_finetuning(getkey):
    """Density 1, no reselection: training values == training W with the same Adam."""
    params = {"w": _w((4, 3))}
    x, y = _w((8, 4), seed=1), _w((8, 3), seed=2)

    def loss_w(p):
        return jnp.mean((x @ p["w"] - y) ** 2)

    a = tree.assign(params, [tree.Rule(where="w", then=adapters.sparse_delta(1.0))])
    st = adapters.init(a, getkey(), params)
    opt = optax.adam(0.05)
    with jax.numpy_dtype_promotion("standard"):
        dense, ds = params, opt.init(params)
        tr, ts = st.trainable, opt.init(st.trainable)
        for _ in range(5):
            g = jax.grad(loss_w)(dense)
            u, ds = opt.update(g, ds, dense)
            dense = optax.apply_updates(dense, u)
            g = jax.grad(lambda t: loss_w(adapters.materialize(a, params, t, st.frozen)))(tr)
            u, ts = opt.update(g, ts, tr)
            tr = optax.apply_updates(tr, u)
    np.testing.assert_allclose(h.f64(adapters.fold(a, params, tr, st.frozen)["w"]),
                               h.f64(dense["w"]), **h.MATMUL_F32)
