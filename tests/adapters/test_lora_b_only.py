"""Asymmetric B-only LoRA (peftjax.adapters.lora_b_only): the paper's update with A frozen,
its random orthogonal A (orthonormal columns, a fresh draw per key), the count r·out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h


def ref_lora_b_only(w, t, f, s=2.0):
    """float64 ``W0 + s·a@b`` with ``a`` frozen (the contract suite's reference)."""
    return h.f64(w) + s * h.f64(f.a) @ h.f64(t.b)


def test_lora_b_only_random_a_and_count():
    w = jnp.zeros((8, 5))
    ad = adapters.lora_b_only(3, alpha=6.0)
    init = jax.jit(ad.init)
    t, f = init(jax.random.key(0), w)
    _, f2 = init(jax.random.key(1), w)
    a = np.asarray(f.a, np.float64)
    np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-6)  # orthonormal columns
    assert not np.allclose(a, np.asarray(f2.a))  # a draw, not a fixed basis
    assert np.all(np.asarray(t.b) == 0) and ad.num_trainable(w) == 3 * 5
    assert dict(ad.hyperparameters)["init"] == "orthogonal"
    _, fk = jax.jit(adapters.lora_b_only(3, init=adapters.LoRABOnlyInit.KAIMING_UNIFORM).init)(
        jax.random.key(0), w)
    assert np.abs(np.asarray(fk.a)).max() <= 1 / np.sqrt(8)
    with pytest.raises(TypeError, match="LoRABOnlyInit"):
        adapters.lora_b_only(2, init="orthogonal")
