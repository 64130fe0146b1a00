"""Super-Tuning (adapters.supertuning): PEFT's magnitude support, the Super and
Supra updates in float64, the factored form, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h


def ref_supertuning(w, t, f, s=None):
    """float64 ``W + S_torchᵀ (+ s·a@b)``, ``S_torch.flatten()[p] += value`` (scatter_add)."""
    w = h.f64(w)
    d = np.zeros(w.shape[1] * w.shape[0])
    np.add.at(d, np.asarray(f.indices), h.f64(t.values))
    out = w + d.reshape(w.shape[1], w.shape[0]).T
    if t.a is not None:
        out = out + s * h.f64(t.a) @ h.f64(t.b)
    return out


def test_support_is_torch_topk_of_magnitudes():
    # torch layout W (out=3, in=4) = w.T; topk(|W|.flatten(), 3) written out by hand
    w_torch = np.array([[0.1, -9.0, 0.3, 2.0],
                        [-4.0, 0.2, 0.05, 1.0],
                        [7.0, -0.01, 0.6, -3.0]], np.float32)
    w = jnp.asarray(w_torch.T)
    np.testing.assert_array_equal(adapters.supertuning_support(w, 3), [1, 8, 4])
    np.testing.assert_array_equal(adapters.supertuning_support(w, 2, select_top=False), [9, 6])
    assert adapters.supertuning_count(4, 3, 0.75) == 3  # int(12 * 0.25)
    t, f = adapters.supertuning(0.75).init(jax.random.key(0), w)
    np.testing.assert_array_equal(np.asarray(f.indices), [1, 8, 4])
    assert t.a is None and t.values.shape == (3,)
    np.testing.assert_array_equal(np.asarray(adapters.supertuning(0.75).apply(w, t, f)), w)


@pytest.mark.parametrize("r", [None, 2])
def test_weight_space_and_factored_match_float64(getkey, r):
    ad = adapters.supertuning(0.6, r=r, lora_alpha=None if r is None else 3.0,
                              init_weights=False)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((9, 6)), jnp.float32)
    t, f = ad.init(getkey(), w)
    want = ref_supertuning(w, t, f, s=None if r is None else 1.5)
    if r is None:
        assert np.count_nonzero(want - h.f64(w)) == int(54 * (1 - 0.6))
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), want, **h.MATMUL_F32)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 9)), jnp.float32)
    terms = ad.factored.terms(w, t, f)
    np.testing.assert_allclose(h.f64(x @ w) + h.f64(terms.delta(x)),
                               h.f64(x) @ want, **h.MATMUL_F32)


def test_bad_input():
    with pytest.raises(ValueError, match=r"sparsity=0.99 leaves no trainable entry of a "
                       r"matrix with 18 entries \(in=6, out=3\)"):
        adapters.supertuning().init(jax.random.key(0), jnp.zeros((6, 3)))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        adapters.supertuning(1.0)
    with pytest.raises(ValueError, match=r"lora_alpha=4 needs r"):
        adapters.supertuning(0.5, lora_alpha=4)
    with pytest.raises(TypeError, match=r"select_top must be a bool, got 1"):
        adapters.supertuning(0.5, select_top=1)
    with pytest.raises(TypeError, match=r"supertuning\(sparsity=0.5.*shape \(4, 3\), dtype int32"):
        adapters.supertuning(0.5).init(jax.random.key(0), jnp.zeros((4, 3), jnp.int32))
