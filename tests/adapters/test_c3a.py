"""C3A (adapters.c3a): PEFT's block-circulant update, init and factored form."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def ref_c3a(w, t, f):
    """``W + ΔWᵀ`` in float64: each block the circulant ``C[t, j] = k[(j - t) mod b]``
    built with ``np.roll``, scaled by ``1/in`` (PEFT's layout ``ΔW (out, in)``)."""
    w = h.f64(w)
    k = h.f64(t.kernel)
    m, n, b = k.shape
    dw = np.zeros((m * b, n * b))
    for i in range(m):
        for j in range(n):
            circ = np.stack([np.roll(k[i, j], r) for r in range(b)])  # [t] = roll by t
            dw[i * b:(i + 1) * b, j * b:(j + 1) * b] = circ
    return w + dw.T / w.shape[0]


def test_peft_circulant_numbers():
    # peft 0.21.2: get_circulant_fast(tensor([[[1., 2., 3.]]])) / 3 (torch (out, in)).
    peft = np.array([[1 / 3, 2 / 3, 1.0], [1.0, 1 / 3, 2 / 3], [2 / 3, 1.0, 1 / 3]])
    ad = adapters.c3a(3)
    w = jnp.zeros((3, 3), jnp.float32)
    t = adapters.C3AParams(jnp.asarray([[[1.0, 2.0, 3.0]]]))
    np.testing.assert_allclose(h.f64(ad.apply(w, t, None)), peft.T, **h.ELEMENTWISE_F32)
    np.testing.assert_allclose(ref_c3a(w, t, None), peft.T, rtol=1e-12)


def test_weight_space_and_factored_match_float64(getkey):
    ad = adapters.c3a(4)  # PEFT's default xavier-uniform init: not the identity
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 12)) * 0.5, jnp.float32)
    t, f = ad.init(getkey(), w)
    assert t.kernel.shape == (3, 2, 4) and f is None
    t = adapters.C3AParams(t.kernel * 10)
    want = ref_c3a(w, t, f)
    assert np.abs(want - h.f64(w)).max() > 0.5
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), want, **h.MATMUL_F32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 8)), jnp.float32)
    got = h.f64(x @ w) + h.f64(ad.factored.terms(w, t, f).delta(x))
    np.testing.assert_allclose(got, h.f64(x) @ want, **h.MATMUL_F32)
    # Stacked layers: independent kernels per layer.
    st = ad.with_dimension_numbers(tree.dims.stacked())
    ws = jnp.stack([w, -w])
    ts, _ = st.init(getkey(), ws)
    assert ts.kernel.shape == (2, 3, 2, 4)
    assert not np.allclose(h.f64(ts.kernel[0]), h.f64(ts.kernel[1]))


@pytest.mark.parametrize("init,bound", [
    ("xavier_uniform", math.sqrt(6.0 / (8 + 12))),
    (False, math.sqrt(6.0 / (8 + 12))),
    ("kaiming_uniform", math.sqrt(1.0 / 8)),
])
def test_peft_uniform_inits(init, bound, getkey):
    t, _ = adapters.c3a(2, init_weights=init).init(getkey(), jnp.zeros((8, 12)))
    k = h.f64(t.kernel)
    assert t.kernel.dtype == jnp.float32 and k.shape == (6, 4, 2)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.6 * bound


def test_gaussian_and_identity_inits(getkey):
    t, _ = adapters.c3a(2, init_weights="gaussian").init(getkey(), jnp.zeros((64, 64)))
    assert abs(float(jnp.std(t.kernel)) - 1.0) < 0.05
    ad = adapters.c3a(2, init_weights=True)
    w = jnp.ones((4, 6))
    t, f = ad.init(getkey(), w)
    np.testing.assert_array_equal(np.asarray(ad.apply(w, t, f)), np.asarray(w))
    assert ad.num_trainable(w) == 4 * 6 // 2


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"block_size=4 must divide both in and out .*"
                       r"\(in=8, out=6\) of a kernel of shape \(8, 6\) float32"):
        adapters.c3a(4).init(jax.random.key(0), jnp.zeros((8, 6), jnp.float32))
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        adapters.c3a(0)
    with pytest.raises(ValueError, match="init_weights must be True, False or one of"):
        adapters.c3a(2, init_weights="orthogonal")
