"""LT-SFT masks (docs/methods.md#lt-sft)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, masks
from tests import helpers as h


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}


def _loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["a"]) @ p["b"] - y) ** 2)


def test_mask_is_global_top_k_and_ties_add_more():
    p0 = {"a": jnp.zeros((2, 2)), "b": jnp.zeros(3)}
    p = {"a": jnp.array([[1.0, 4.0], [2.0, 0.0]]), "b": jnp.array([3.0, 2.0, -5.0])}
    m = masks.lt_sft_mask(p, p0, k=3)
    assert m["a"].tolist() == [[False, True], [False, False]]
    assert m["b"].tolist() == [True, False, True]
    tied = masks.lt_sft_mask(p, p0, k=4)  # the 4th largest (2.0) is tied
    assert sum(int(x.sum()) for x in jax.tree.leaves(tied)) == 5
    m2 = masks.lt_sft_mask(p, p0, proportion=0.5, maskable={"a": True, "b": False})
    assert not bool(m2["b"].any()) and int(m2["a"].sum()) == 2
    with pytest.raises(ValueError, match="exactly one of k and proportion"):
        masks.lt_sft_mask(p, p0)
    with pytest.raises(ValueError, match=r"K=99 must be in \[1, 7\]"):
        masks.lt_sft_mask(p, p0, k=99)


def test_full_phase_then_masked_sparse_phase_with_weight_decay():
    p0 = _params()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)
    grad = jax.jit(jax.grad(_loss))
    with jax.numpy_dtype_promotion("standard"):
        dense, opt = p0, optax.adam(0.05)
        st = opt.init(dense)
        for _ in range(5):  # 1. full fine-tuning
            u, st = opt.update(grad(dense, x, y), st, dense)
            dense = optax.apply_updates(dense, u)
        mask = masks.lt_sft_mask(dense, p0, k=6)  # 2. global top-K
        assert sum(int(m.sum()) for m in jax.tree.leaves(mask)) == 6
        sparse = p0  # 3. reset to θ0, 4. new optimizer, masked updates
        tx = masks.lt_sft(optax.adamw(0.05, weight_decay=0.5), mask)
        st = tx.init(sparse)
        for _ in range(5):
            u, st = tx.update(grad(sparse, x, y), st, sparse)
            sparse = optax.apply_updates(sparse, u)
    for name in p0:
        off = ~np.asarray(mask[name])
        np.testing.assert_array_equal(np.asarray(sparse[name])[off], np.asarray(p0[name])[off])
        assert (np.asarray(sparse[name])[~off] != np.asarray(p0[name])[~off]).any()
    assert float(_loss(sparse, x, y)) < float(_loss(p0, x, y))
    # Export, load and compose: merging the export onto θ0 gives θ.
    compact = masks.lt_sft_export(sparse, p0, mask)
    a, s = adapters.sparse_from_compact(compact, p0)
    h.assert_tree_allclose(adapters.fold(a, p0, *s), sparse, **h.ELEMENTWISE_F32)


def test_composition_of_two_lt_sfts_is_additive():
    p0 = _params()
    p1 = {"a": p0["a"].at[0, 0].add(1.0), "b": p0["b"]}
    p2 = {"a": p0["a"].at[1, 2].add(-2.0), "b": p0["b"].at[3, 1].add(0.5)}
    composed = p0
    for p in (p1, p2):
        mask = masks.lt_sft_mask(p, p0, k=1 if p is p1 else 2)
        a, s = adapters.sparse_from_compact(masks.lt_sft_export(p, p0, mask), p0)
        composed = adapters.fold(a, composed, *s)
    want = jax.tree.map(lambda x, y, z: x + y + z, jax.tree.map(lambda a, b: a - b, p1, p0),
                        jax.tree.map(lambda a, b: a - b, p2, p0), p0)
    h.assert_tree_allclose(composed, want, **h.ELEMENTWISE_F32)
