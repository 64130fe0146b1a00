"""SHiRA (adapters.shira): PEFT's random mask (torch.randperm reproduced), the
scatter formula in float64, the factored (segment-sum) form, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def ref_shira(w, t, f):
    """float64 ``W + ΔW_torchᵀ``, ``ΔW_torch[row, col] = value`` (PEFT's sparse COO)."""
    w = h.f64(w)
    d = np.zeros((w.shape[1], w.shape[0]))
    idx = np.asarray(f.indices)
    np.add.at(d, (idx[0], idx[1]), h.f64(t.values))
    return w + d.T


# torch.where(random_mask(nn.Linear(in, out), r, random_seed) == 1) printed with
# peft 0.21.2 on torch 2.13 (CPU): (out, in, r, seed) -> (rows, columns).
TORCH_MASKS = [
    ((4, 6, 1, 0), [0, 0, 0, 0, 0, 1, 2, 2, 2, 3], [1, 2, 3, 4, 5, 1, 0, 1, 5, 2]),
    ((5, 7, 2, None),
     [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4],
     [0, 5, 6, 1, 2, 3, 4, 6, 0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 0, 3, 4, 5, 6]),
]


@pytest.mark.parametrize("args,rows,cols", TORCH_MASKS)
def test_mask_reproduces_peft_random_mask(args, rows, cols):
    idx = adapters.shira_indices(*args)
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(idx[0], rows)
    np.testing.assert_array_equal(idx[1], cols)


def test_init_is_identity_and_count_is_lora_sized(getkey):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((7, 5)), jnp.float32)
    ad = adapters.shira(2, random_seed=None)
    t, f = ad.init(getkey(), w)  # Flax (in=7, out=5): torch (out=5, in=7)
    assert t.values.shape == (2 * (7 + 5),)
    np.testing.assert_array_equal(np.asarray(f.indices), np.array(TORCH_MASKS[1][1:]))
    np.testing.assert_array_equal(np.asarray(ad.apply(w, t, f)), np.asarray(w))
    t_rand, _ = adapters.shira(2, init_weights=False).init(getkey(), w)
    assert float(jnp.std(t_rand.values)) > 0.5


def test_weight_space_factored_and_stacked_match_float64(getkey):
    ad = adapters.shira(2, random_seed=3, init_weights=False)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((9, 6)), jnp.float32)
    t, f = ad.init(getkey(), w)
    want = ref_shira(w, t, f)
    assert np.count_nonzero(want - h.f64(w)) == 2 * (9 + 6)
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), want, **h.MATMUL_F32)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 9)), jnp.float32)
    terms = ad.factored.terms(w, t, f)
    np.testing.assert_allclose(h.f64(x @ w) + h.f64(terms.delta(x)),
                               h.f64(x) @ want, **h.MATMUL_F32)
    # Stacked layers: the same mask per layer (PEFT seeds every matrix alike);
    # the factored form under vmap over the layer axis equals the loop.
    st = ad.with_dimension_numbers(tree.dims.stacked())
    ws = jnp.stack([w, 2 * w])
    ts, fs = st.init(getkey(), ws)
    np.testing.assert_array_equal(np.asarray(fs.indices[0]), np.asarray(fs.indices[1]))
    got = jax.vmap(lambda wi, ti, fi: ad.factored.terms(wi, ti, fi).delta(x[0]))(ws, ts, fs)
    for i in range(2):
        ti = jax.tree.map(lambda a, i=i: a[i], ts)
        fi = jax.tree.map(lambda a, i=i: a[i], fs)
        np.testing.assert_allclose(h.f64(x[0] @ ws[i]) + h.f64(got[i]),
                                   h.f64(x[0]) @ ref_shira(ws[i], ti, fi), **h.MATMUL_F32)


def test_bad_input():
    with pytest.raises(ValueError, match=r"r=3 gives r\*\(in\+out\)=27 values, more than "
                       r"the 18 entries of a matrix \(in=6, out=3\)"):
        adapters.shira(3).init(jax.random.key(0), jnp.zeros((6, 3)))
    with pytest.raises(ValueError, match=r"shira: r must be a positive int, got 0"):
        adapters.shira(0)
    with pytest.raises(TypeError, match=r"random_seed must be an int or None, got '1'"):
        adapters.shira(1, random_seed="1")
    with pytest.raises(TypeError, match=r"shira\(r=1.*shape \(4, 3\), dtype int32"):
        adapters.shira(1).init(jax.random.key(0), jnp.zeros((4, 3), jnp.int32))
