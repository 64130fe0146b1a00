"""MoS (adapters.mos): the authors' shard assembly (goldens), pools, counts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "mos", "mos.npz")


def ref_mos(w, t, f, s):
    """``W + s·Aᵀ Bᵀ`` in float64, rows of A/Bᵀ = public shards then private ones."""
    def rows(pool, idx, private):
        pub = h.f64(pool)[np.asarray(idx)]                     # (r-p, l, n/l)
        pub = pub.reshape(pub.shape[0], -1)
        priv = h.f64(private)
        n = pub.shape[1] if pub.shape[0] else priv.size // max(1, priv.shape[0])
        return np.concatenate([pub.reshape(-1, n), priv.reshape(-1, n)])
    a = rows(t.pool_a, f.indices_a, t.private_a)    # A (r, in)
    b = rows(t.pool_b, f.indices_b, t.private_b)    # Bᵀ (r, out)
    return h.f64(w) + s * a.T @ b


def test_matches_the_authors_shard_assembly():
    g = np.load(GOLDEN)
    *ints, alpha = g["config"].tolist()
    n_layers, n_in, n_out, r, r_pool, p, ns = map(int, ints)
    public = (r_pool - p) * n_layers * ns
    ad = adapters.unshare(adapters.mos(r, pool_rank=r_pool, private_rank=p, num_shards=ns,
                                       alpha=alpha, public_shards=public))
    w = jnp.zeros((n_in, n_out))
    t0, f0 = ad.init(jax.random.key(0), w)
    apply = jax.jit(ad.apply)
    for k in range(n_layers):
        own = slice(public + k * p * ns, public + (k + 1) * p * ns)
        t = t0._replace(pool_a=jnp.asarray(g["pool_a"][:public]),
                        pool_b=jnp.asarray(g["pool_b_t"][:public]),
                        private_a=jnp.asarray(g["pool_a"][own]),
                        private_b=jnp.asarray(g["pool_b_t"][own]))
        np.testing.assert_array_equal(g["masks_a"][k][(r - p) * ns:], np.arange(own.start,
                                                                              own.stop))
        f = f0._replace(indices_a=jnp.asarray(g["masks_a"][k][:(r - p) * ns].reshape(-1, ns)),
                        indices_b=jnp.asarray(g["masks_b"][k][:(r - p) * ns].reshape(-1, ns)))
        np.testing.assert_allclose(h.f64(apply(w, t, f)), g["delta"][k].T, **h.MATMUL_F32)


def test_pools_shared_per_shape_with_private_shards():
    params = {"q": {"kernel": jnp.ones((3, 8, 4))}, "k": jnp.ones((8, 4)),
              "o": {"kernel": jnp.ones((2, 4, 8))}}
    ad = adapters.mos(3, pool_rank=2, private_rank=1, num_shards=2, alpha=6.0, seed=1)
    stacked = ad.with_dimension_numbers(tree.dims.stacked())
    a = tree.assign(params, [tree.Rule(where="q/kernel|o/kernel", then=stacked),
                             tree.Rule(where="k", then=ad)])
    s = jax.jit(lambda k: adapters.init(a, k, params))(jax.random.key(0))
    pools = s.trainable[adapters.SHARED]
    # 8x4: L = 4 matrices, (R-p)·L·l = 8 public shards; 4x8: L = 2, 4 shards.
    assert {n: x.shape for n, x in pools.items()} == {
        "mos_8x4_a": (8, 4), "mos_8x4_b": (8, 2), "mos_4x8_a": (4, 2), "mos_4x8_b": (4, 4)}
    # LoRA's count at rank R = 2: R·(in+out) per matrix.
    assert adapters.num_trainable(s.trainable) == 2 * 12 * 6
    assert float(jnp.abs(pools["mos_8x4_b"]).max()) == 0.0
    assert float(jnp.abs(pools["mos_8x4_a"]).max()) <= 8 ** -0.5
    idx = np.asarray(s.frozen["q/kernel"].indices_a)                # (3, r-p, l)
    assert idx.shape == (3, 2, 2) and all(len(set(x.ravel())) == 4 for x in idx)
    assert not np.array_equal(idx, np.asarray(s.frozen["q/kernel"].indices_b))
    h.assert_tree_allclose(
        jax.jit(lambda t: adapters.materialize(a, params, t, s.frozen))(s.trainable),
        params, **h.EXACT)
    t = dict(s.trainable)
    rng = np.random.default_rng(0)
    t[adapters.SHARED] = {n: jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
                          for n, x in pools.items()}
    t["k"] = t["k"]._replace(private_b=jnp.ones_like(t["k"].private_b))
    m = jax.jit(lambda t: adapters.materialize(a, params, t, s.frozen))(t)
    want = ref_mos(params["k"], t["k"]._replace(pool_a=t[adapters.SHARED]["mos_8x4_a"],
                                                pool_b=t[adapters.SHARED]["mos_8x4_b"]),
                   s.frozen["k"], s=2.0)
    np.testing.assert_allclose(h.f64(m["k"]), want, **h.MATMUL_F32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="private_rank=3 exceeds"):
        adapters.mos(2, private_rank=3)
    with pytest.raises(ValueError, match="num_shards must be an int >= 1"):
        adapters.mos(2, num_shards=0)
    with pytest.raises(ValueError, match=r"input size 6 of the matrix \(in=6, out=4\) is "
                                         r"not a multiple of num_shards=4"):
        adapters.mos(2, num_shards=4).init(jax.random.key(0), jnp.zeros((6, 4)))
    params = {"w": jnp.zeros((4, 4))}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.mos(4, pool_rank=2,
                                                                    num_shards=2))])
    with pytest.raises(ValueError, match=r"need 6 distinct public shards each .* the "
                                         r"pool has 2"):
        adapters.init(a, jax.random.key(0), params)
