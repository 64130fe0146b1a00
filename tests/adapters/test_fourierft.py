"""FourierFT (adapters.fourierft): PEFT's positions, float64 formula, factored form."""

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h


def ref_fourierft(w, t, f, *, s):
    """``W + s · Re(ifft2(dense))ᵀ`` in float64 with NumPy's FFT."""
    w = h.f64(w)
    dense = np.zeros((w.shape[1], w.shape[0]), np.complex128)
    idx = np.asarray(f.indices)
    dense[idx[0], idx[1]] = h.f64(t.spectrum)
    return w + s * np.fft.ifft2(dense).real.T


# torch.randperm(12, generator=torch.Generator().manual_seed(777)) in peft 0.21.2's
# torch 2.13 (CPU), the first 5 entries; rows = k // in, columns = k % in (in = 4).
TORCH_PERM_12_SEED_777 = [11, 7, 3, 8, 0]


def test_indices_reproduce_torch_randperm():
    idx = adapters.fourierft_indices(3, 4, 5, seed=777)
    flat = idx[0] * 4 + idx[1]
    np.testing.assert_array_equal(flat, TORCH_PERM_12_SEED_777)
    assert idx.dtype == np.int32 and len(set(flat.tolist())) == 5
    with pytest.raises(ValueError, match=r"n_frequency must be in \[1, out\*in=12\]"):
        adapters.fourierft_indices(3, 4, 13)


def test_weight_space_and_factored_match_float64(getkey):
    ad = adapters.fourierft(9, scaling=150.0, random_loc_seed=3)  # PEFT's N(0,1) init
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 6)) * 0.5, jnp.float32)
    t, f = ad.init(getkey(), w)
    assert float(jnp.abs(t.spectrum).max()) > 0  # not the identity by default
    want = ref_fourierft(w, t, f, s=150.0)
    assert np.abs(want - h.f64(w)).max() > 1.0
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), want, rtol=1e-5, atol=1e-5)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8)), jnp.float32)
    terms = ad.factored.terms(w, t, f)
    got = h.f64(x @ w) + h.f64(terms.delta(x))
    np.testing.assert_allclose(got, h.f64(x) @ want, rtol=1e-4, atol=1e-4)
