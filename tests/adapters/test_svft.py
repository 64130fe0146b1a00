"""SVFT (peftjax.adapters.svft): the authors' merged weight and supports (goldens from
scripts/golden/svft_make.py), the paper's invariants (count k, plain = singular-value
shift, band shape), the authors' init, errors."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).parent / "golden" / "svft"
PATTERN = {"plain": "plain", "banded": "banded", "random": "random", "topk": "top_k"}


def _m(t, f, n):
    """float64 dense ``M_K (n, n)`` (duplicates add)."""
    m = np.zeros((n, n))
    np.add.at(m, (np.asarray(f.rows), np.asarray(f.cols)), h.f64(t.values))
    return m / (1.0 + np.exp(-h.f64(t.gate)))


def ref_svft(w, t, f):
    """float64 ``W + sigmoid(g) · U M_K Vᵀ`` (kernel layout)."""
    return h.f64(w) + h.f64(f.u) @ _m(t, f, f.u.shape[1]) @ h.f64(f.vt)


def _pairs(rows, cols):
    return sorted(zip(np.asarray(rows).tolist(), np.asarray(cols).tolist(), strict=True))


def test_svft_matches_the_authors_merged_weight():
    """Every golden case: merged weight, inverse, factored output, support (float64)."""
    paths = sorted(GOLDEN.glob("*.npz"))
    assert len(paths) == 6
    for path in paths:
        _check_golden(dict(np.load(path)), PATTERN[path.stem.split("_")[0]])


def _check_golden(g, pattern):
    d, n = int(g["off_diag"]), int(g["rank"])
    ad = adapters.svft(pattern, off_diag=d, rank=n, param_dtype=jnp.float64)

    @jax.jit
    def run(k, t, basis, x):  # one compilation per case
        got = ad.apply(k, t, basis)
        y = x @ k + ad.factored.terms(k, t, basis).delta(x)
        support = adapters.svft_pattern(pattern, basis.u, basis.vt, d, jax.random.key(0))
        return got, ad.unapply(got, t, basis, None), y, support

    with jax.enable_x64(True):
        # torch (out, in) = U (S + M) Vh; the kernel K = Wᵀ: u_K = Vhᵀ, vt_K = Uᵀ, M_K = Mᵀ.
        basis = adapters.SVFTBasis(u=jnp.asarray(g["vh"].T), vt=jnp.asarray(g["u"].T),
                                   singular_values=jnp.asarray(g["s"]),
                                   rows=jnp.asarray(g["cols"]), cols=jnp.asarray(g["rows"]))
        t = adapters.SVFTParams(values=jnp.asarray(g["values"]), gate=jnp.asarray(g["gate"]))
        got, back, y, (rows, cols) = jax.tree.map(
            np.asarray, run(jnp.asarray(g["w"].T), t, basis, jnp.asarray(g["x"])))
    want = g["merged"].T
    if n < min(g["w"].shape):  # the authors drop W - U_n S_n V_nᵀ; peftjax keeps it
        want = want + (g["w"] - (g["u"] * g["s"]) @ g["vh"]).T
    else:
        np.testing.assert_allclose(y, g["y"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(back, g["w"].T, rtol=1e-12, atol=1e-12)
    # The support from the same singular vectors: the authors' set (random: its law).
    assert rows.shape == cols.shape == (adapters.svft_count(n, d),) == g["rows"].shape
    if pattern == "random":
        assert 0 <= rows.min() and rows.max() < n
    else:
        assert _pairs(rows, cols) == _pairs(g["cols"], g["rows"])
    return float(np.abs(got - want).max())


def test_svft_init_invariants(getkey):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((40, 24)), jnp.float32)
    ad = adapters.svft()  # plain
    t, f = jax.jit(ad.init)(getkey(), w)
    # The authors' init: kaiming-normal over a (1, k) view, N(0, 2/k); gate 0.
    assert t.values.shape == (24,) and float(t.gate) == 0.0
    np.testing.assert_allclose(np.std(h.f64(t.values)), np.sqrt(2 / 24), rtol=0.35)
    # Plain: W' = U (Σ + σ(g)·values) Vᵀ, so W''s singular values move by σ(g)·values.
    shift = np.linspace(0.3, 0.1, 24)
    apply = jax.jit(ad.apply)
    w2 = apply(w, t._replace(values=jnp.asarray(shift, jnp.float32)), f)
    np.testing.assert_allclose(np.linalg.svd(h.f64(w2), compute_uv=False),
                               h.f64(f.singular_values) + 0.5 * shift, rtol=1e-5)
    np.testing.assert_array_equal(  # values 0 (zero_init): the identity
        np.asarray(apply(w, t._replace(values=jnp.zeros(24)), f)), np.asarray(w))
    # k = n(2d+1) - d(d+1) values and a gate, whatever the pattern; stacked: per layer.
    for pattern in ("banded", "random", "top_k"):
        ad = adapters.svft(pattern, off_diag=2)
        assert ad.num_trainable(w) == 24 * 5 - 6 + 1
        stacked = ad.with_dimension_numbers(tree.dims.stacked())
        assert stacked.num_trainable(jnp.stack([w, w])) == 2 * (24 * 5 - 6 + 1)


def test_svft_errors():
    with pytest.raises(ValueError, match="pattern"):
        adapters.svft("diagonal")
    with pytest.raises(ValueError, match="plain.*off_diag=1"):
        adapters.svft("plain", off_diag=1)
    with pytest.raises(ValueError, match="off_diag"):
        adapters.svft("banded", off_diag=-1)
    with pytest.raises(ValueError, match="rank"):
        adapters.svft(rank=0)
    w = jnp.ones((6, 4))
    with pytest.raises(ValueError, match=r"rank=5 exceeds.*\(6, 4\)"):
        adapters.svft(rank=5).num_trainable(w)
    with pytest.raises(ValueError, match=r"off_diag must be in \[0, n=4\)"):
        adapters.svft("banded", off_diag=4).num_trainable(w)
    with pytest.raises(ValueError, match="top_k.*full rank 4"):
        adapters.svft("top_k", off_diag=1, rank=3).num_trainable(w)
