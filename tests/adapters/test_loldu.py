"""LoLDU (peftjax.adapters.loldu): the authors' factors and merged weight (goldens from
scripts/golden/loldu_make.py), the LDU invariants (triangular unit factors, permutation,
reconstruction, rank of the update), errors."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).parent / "golden" / "loldu"


def ref_loldu(w, t, f, *, alpha=1.0):
    """float64 ``W + (alpha/r) · U_rᵀ diag(z - D_r) (P L_r)ᵀ`` (kernel layout)."""
    r = f.d.shape[-1]
    step = h.f64(t.z) - h.f64(f.d)
    return h.f64(w) + alpha / r * (h.f64(f.u) * step[None, :]) @ h.f64(f.lower)


def _check_golden(g):
    r, alpha = int(g["rank"]), float(g["alpha"])
    ad = adapters.loldu(r, alpha=alpha, param_dtype=jnp.float64)

    @jax.jit
    def run(k, z, x):  # one compilation per case
        t, f = ad.init(jax.random.key(0), k)
        t = t._replace(z=z)
        got = ad.apply(k, t, f)
        y = x @ k + ad.factored.terms(k, t, f).delta(x)
        return f, got, ad.unapply(got, t, f, None), y

    with jax.enable_x64(True):
        f, got, back, y = jax.tree.map(np.asarray, run(
            jnp.asarray(g["w"].T), jnp.asarray(g["z"]), jnp.asarray(g["x"])))
    # The authors' factors (torch layout) from the same LU with partial pivoting.
    np.testing.assert_allclose(f.u, g["u"][:r].T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f.lower, (g["p"] @ g["l"][:, :r]).T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f.d, g["d"][:r], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, g["merged"].T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(back, g["w"].T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, g["y"], rtol=1e-12, atol=1e-12)
    return float(np.abs(got - g["merged"].T).max())


def test_loldu_matches_the_authors_merged_weight():
    paths = sorted(GOLDEN.glob("*.npz"))
    assert len(paths) == 3
    for path in paths:
        _check_golden(dict(np.load(path)))


def test_loldu_ldu_invariants():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((7, 5))  # torch layout (out, in)
    with jax.enable_x64(True):
        p, low, d, up = jax.tree.map(np.asarray, jax.jit(adapters.ldu)(jnp.asarray(w)))
    # P a permutation; L unit lower, U unit upper (the paper's LDU); P L D U = W.
    np.testing.assert_array_equal(np.sort(p.sum(0)), np.ones(7))
    np.testing.assert_array_equal(p @ p.T, np.eye(7))
    np.testing.assert_allclose(np.triu(low, 1), 0.0, atol=0)
    np.testing.assert_allclose(np.diag(low), 1.0, rtol=1e-14)
    np.testing.assert_allclose(np.tril(up, -1), 0.0, atol=0)
    np.testing.assert_allclose(np.diag(up), 1.0, rtol=1e-14)
    np.testing.assert_allclose(p @ low @ np.diag(d) @ up, w, rtol=1e-12, atol=1e-12)
    assert np.abs(low).max() <= 1.0 + 1e-12  # partial pivoting


def test_loldu_update_has_rank_r_and_default_is_full_width(getkey):
    w = jnp.asarray(np.random.default_rng(4).standard_normal((9, 6)), jnp.float32)
    ad = adapters.loldu(2)
    t, f = jax.jit(ad.init)(getkey(), w)
    assert ad.num_trainable(w) == 2 and f.u.shape == (9, 2) and f.lower.shape == (2, 6)
    np.testing.assert_array_equal(np.asarray(t.z), np.asarray(f.d))  # z = D_r at init
    delta = h.f64(ad.apply(w, t._replace(z=t.z + 1.0), f)) - h.f64(w)
    np.testing.assert_allclose(delta, ref_loldu(w, t._replace(z=t.z + 1.0), f) - h.f64(w),
                               rtol=1e-5, atol=1e-6)
    assert np.linalg.matrix_rank(delta, tol=1e-5) == 2
    assert adapters.loldu().num_trainable(w) == 6  # None: min(in, out)
    stacked = adapters.loldu().with_dimension_numbers(tree.dims.stacked())
    assert stacked.num_trainable(jnp.zeros((4, 9, 6))) == 4 * 6


def test_loldu_errors():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="loldu: rank"):
            adapters.loldu(bad)
    with pytest.raises(ValueError, match="alpha"):
        adapters.loldu(2, alpha=float("nan"))
    with pytest.raises(ValueError, match=r"rank=5 exceeds.*\(6, 4\)"):
        adapters.loldu(5).num_trainable(jnp.ones((6, 4)))
