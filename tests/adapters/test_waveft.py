"""WaveFT (adapters.waveft): PEFT's positions and inverse DWT, float64, factored form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from peftjax.adapters import _waveft
from tests import helpers as h


def _idwt2(coef, lo, hi):
    """One-level inverse 2-D DWT as a literal upsample-and-filter of the four
    quadrants (2-D filters are outer products; the top-right quadrant uses
    ``outer(hi, lo)``, the bottom-left ``outer(lo, hi)``), then the border trim."""
    rows, cols = coef.shape
    r2, c2 = rows // 2, cols // 2
    n = lo.size
    quads = [(coef[:r2, :c2], lo, lo), (coef[:r2, c2:], hi, lo),
             (coef[r2:, :c2], lo, hi), (coef[r2:, c2:], hi, hi)]
    full = np.zeros((2 * (r2 - 1) + n, 2 * (c2 - 1) + n))
    for q, frow, fcol in quads:
        for i in range(r2):
            for j in range(c2):
                full[2 * i:2 * i + n, 2 * j:2 * j + n] += q[i, j] * np.outer(frow, fcol)
    cut = (2 * n - 3) // 2
    return full[cut:full.shape[0] - cut, cut:full.shape[1] - cut]


def ref_waveft(w, t, f, *, s, family="db1", use_idwt=True):
    """``W + s·IDWT2(padded ToDense(E, c))ᵀ`` (centre-cropped) in float64."""
    w = h.f64(w)
    n_in, n_out = w.shape
    idx = np.asarray(f.indices)
    c = h.f64(t.spectrum)
    if not use_idwt:
        dense = np.zeros((n_out, n_in))
        dense[idx[0], idx[1]] = c
        return w + s * dense.T
    lo, hi = _waveft._filters(family)
    rows, cols = n_out + lo.size - 2, n_in + lo.size - 2
    rows, cols = rows + rows % 2, cols + cols % 2
    dense = np.zeros((rows, cols))
    dense[idx[0] + (rows - n_out) // 2, idx[1] + (cols - n_in) // 2] = c
    rec = _idwt2(dense, lo, hi)
    r0, c0 = (rec.shape[0] - n_out) // 2, (rec.shape[1] - n_in) // 2
    return w + s * rec[r0:r0 + n_out, c0:c0 + n_in].T


def test_peft_delta_numbers():
    # peft 0.21.2, WaveFTConfig(n_frequency=5, scaling=2.0, wavelet_family="db2",
    # random_loc_seed=777) on Linear(4, 3), waveft_spectrum = [1, 2, 3, 4, 5]:
    # waveft_indices and get_delta_weight() (torch (out, in)), float64.
    peft_idx = [[2, 1, 0, 2, 0], [3, 3, 3, 0, 0]]
    peft = np.array([
        [1.508974596216, 2.613620667976, 3.808012701892, -2.198557158515],
        [3.649519052838, 6.321152422707, -0.100480947162, 0.058012701892],
        [3.256569860407, 5.640544456623, 1.511379332024, -0.872595264192]])
    ad = adapters.waveft(5, scaling=2.0, wavelet_family="db2")
    w = jnp.zeros((4, 3), jnp.float32)
    _, f = ad.init(jax.random.key(0), w)
    np.testing.assert_array_equal(np.asarray(f.indices), peft_idx)
    t = adapters.WaveFTParams(jnp.arange(1.0, 6.0))
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), peft.T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref_waveft(w, t, f, s=2.0, family="db2"), peft.T,
                               rtol=0, atol=1e-11)


@pytest.mark.parametrize("family,use_idwt,shape", [
    ("db1", True, (8, 6)), ("db3", True, (7, 9)), ("sym4", True, (12, 5)),
    ("coif2", True, (6, 11)), ("db2", False, (8, 6)),
])
def test_weight_space_and_factored_match_float64(family, use_idwt, shape, getkey):
    ad = adapters.waveft(13, scaling=25.0, wavelet_family=family, use_idwt=use_idwt,
                         random_loc_seed=3)
    w = jnp.asarray(np.random.default_rng(0).standard_normal(shape) * 0.5, jnp.float32)
    t, f = ad.init(getkey(), w)
    assert float(jnp.abs(t.spectrum).max()) == 0.0  # PEFT's default: the identity
    t = adapters.WaveFTParams(jnp.asarray(np.random.default_rng(2).standard_normal(13),
                                          jnp.float32))
    want = ref_waveft(w, t, f, s=25.0, family=family, use_idwt=use_idwt)
    assert np.abs(want - h.f64(w)).max() > 1.0
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), want, rtol=1e-5, atol=1e-5)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, shape[0])), jnp.float32)
    got = h.f64(x @ w) + h.f64(ad.factored.terms(w, t, f).delta(x))
    np.testing.assert_allclose(got, h.f64(x) @ want, rtol=1e-4, atol=1e-4)


def test_filters_are_orthonormal_wavelets():
    for family in adapters.waveft_wavelets():
        lo, hi = _waveft._filters(family)
        n = lo.size
        assert abs(lo.sum() - np.sqrt(2)) < 1e-10, family
        for shift in range(0, n, 2):  # double-shift orthonormality
            want = 1.0 if shift == 0 else 0.0
            assert abs(lo[shift:] @ lo[:n - shift] - want) < 1e-10, (family, shift)
            assert abs(lo[shift:] @ hi[:n - shift]) < 1e-10, (family, shift)
        assert abs(hi.sum()) < 1e-10, family  # a vanishing moment...
        if n >= 4:  # ...and a second one for every family but the Haar wavelet
            assert abs(hi @ np.arange(n)) < 1e-9 * n, family


def test_init_and_bad_arguments(getkey):
    t, _ = adapters.waveft(4000, init_weights=False).init(getkey(), jnp.zeros((80, 60)))
    assert abs(float(jnp.std(t.spectrum)) - 0.01) < 0.001  # PEFT: 0.01 * randn
    with pytest.raises(ValueError, match=r"n_frequency=21 exceeds in\*out=20 .*"
                       r"\(in=5, out=4\) of a kernel of shape \(5, 4\) float32"):
        adapters.waveft(21).init(getkey(), jnp.zeros((5, 4), jnp.float32))
    with pytest.raises(ValueError, match="coif4.* is refused: PEFT's coif4 table"):
        adapters.waveft(4, wavelet_family="coif4")
    with pytest.raises(ValueError, match="unknown wavelet_family='db11'"):
        adapters.waveft(4, wavelet_family="db11")
    with pytest.raises(ValueError, match="n_frequency must be a positive int"):
        adapters.waveft(0)
