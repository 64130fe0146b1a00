"""UniLoRA (adapters.unilora): PEFT's index assignment, float64 formula, sharing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def ref_unilora(w, t, f):
    """``W + (B @ A)ᵀ`` with ``A = θ[idx_A]·s_A``, ``B = θ[idx_B]·s_B`` in float64."""
    theta = h.f64(t.theta_d)
    a = theta[np.asarray(f.indices_a)] * h.f64(f.scales_a)   # (in, r) = Aᵀ
    b = theta[np.asarray(f.indices_b)] * h.f64(f.scales_b)   # (r, out) = Bᵀ
    return h.f64(w) + a @ b


# peft 0.21.2: get_peft_model(Sequential-like lin0 = Linear(3, 4), lin1 = Linear(4, 2),
# UniLoraConfig(r=2, theta_d_length=5, proj_seed=7)); its buffers, torch layout
# (indices_A (r, in), indices_B (out, r)); scales are 1/sqrt(5) and 1/sqrt(6).
PEFT_INDICES = {
    "lin0": ([[3, 0, 4], [2, 0, 2]], [[2, 3], [3, 4], [0, 4], [4, 2]]),
    "lin1": ([[1, 1, 0, 3], [1, 3, 1, 2]], [[4, 0], [4, 1]]),
}
S5, S6 = 0.4472135901451111, 0.40824827551841736
PEFT_SCALES = {
    "lin0": ([[S5, S5, S6], [S5, S5, S5]], [[S5, S5], [S5, S6], [S5, S6], [S6, S5]]),
    "lin1": ([[S5] * 4, [S5] * 4], [[S6, S5], [S6, S5]]),
}


def test_indices_and_scales_reproduce_peft():
    got = adapters.unilora_indices([(2, 3, 4), (2, 4, 2)], 5, proj_seed=7)
    for (ia, ib, sa, sb), name in zip(got, ("lin0", "lin1"), strict=True):
        np.testing.assert_array_equal(ia.T, PEFT_INDICES[name][0])
        np.testing.assert_array_equal(ib.T, PEFT_INDICES[name][1])
        np.testing.assert_allclose(sa.T, PEFT_SCALES[name][0], **h.ELEMENTWISE_F32)
        np.testing.assert_allclose(sb.T, PEFT_SCALES[name][1], **h.ELEMENTWISE_F32)


def test_init_assigns_indices_over_all_leaves_and_shares_theta():
    params = {"lin0": {"kernel": jnp.zeros((3, 4))}, "lin1": {"kernel": jnp.zeros((4, 2))}}
    ad = adapters.unilora(2, theta_d_length=5, proj_seed=7)
    a = tree.assign(params, [tree.Rule(where=".*kernel", then=ad)])
    s = adapters.init(a, jax.random.key(0), params)
    for name in ("lin0", "lin1"):
        f = s.frozen[f"{name}/kernel"]
        np.testing.assert_array_equal(np.asarray(f.indices_a).T, PEFT_INDICES[name][0])
        np.testing.assert_array_equal(np.asarray(f.indices_b).T, PEFT_INDICES[name][1])
    theta = s.trainable[adapters.SHARED]["unilora"]
    assert adapters.num_trainable(s.trainable) == 5  # PEFT: theta_d only
    assert float(jnp.abs(theta).max()) <= 0.02 and float(jnp.abs(theta).min()) > 0
    # Each leaf reads the one vector: the materialised kernels match the formula.
    m = adapters.materialize(a, params, *s)
    for name in ("lin0", "lin1"):
        p = f"{name}/kernel"
        want = ref_unilora(params[name]["kernel"], s.trainable[p]._replace(theta_d=theta),
                           s.frozen[p])
        np.testing.assert_allclose(h.f64(m[name]["kernel"]), want, **h.MATMUL_F32)


def test_stacked_leaf_layers_take_consecutive_chunks():
    """A scanned leaf's layers are assigned in turn, as unrolled layers are."""
    stacked = {"layers": {"kernel": jnp.zeros((2, 3, 4))}}
    unrolled = {"layers": {"0": {"kernel": jnp.zeros((3, 4))},
                           "1": {"kernel": jnp.zeros((3, 4))}}}
    ad = adapters.unilora(2, theta_d_length=5)
    out = []
    for params in (stacked, unrolled):
        a = tree.assign(params, [tree.Rule(where=".*kernel", then=ad)])
        out.append(adapters.init(a, jax.random.key(0), params).frozen)
    for i in range(2):
        h.assert_tree_allclose(jax.tree.map(lambda x, i=i: x[i], out[0]["layers/kernel"]),
                               out[1][f"layers/{i}/kernel"], **h.EXACT)


def test_bad_arguments():
    with pytest.raises(ValueError, match="theta_d_length must be a positive int"):
        adapters.unilora(2, theta_d_length=0)
    with pytest.raises(ValueError, match="init_theta_d_bound must be positive"):
        adapters.unilora(2, init_theta_d_bound=0.0)
    with pytest.raises(ValueError, match="vector must be a non-empty name"):
        adapters.unilora(2, vector="")
