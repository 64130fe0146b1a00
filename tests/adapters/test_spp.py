"""SPP (peftjax.adapters.spp): the authors' DiagonalLinear (merge and forward) transcribed
in float64, the kept zero mask and 2:4 pattern of a pruned base through training, init."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).parent / "golden" / "spp" / "spp.npz"


def ref_spp(w, t, f, *, s=2.0):
    """float64 authors' merge (torch layout): W += repeat_interleave(weight)·weight_col·W·s."""
    wt = h.f64(w).T  # (out, in)
    weight = h.f64(t.a).T  # (r, in)
    col = h.f64(t.c)[:, None]  # (out, 1)
    mat1 = np.repeat(weight, wt.shape[0] // weight.shape[0], axis=0)  # (out, in)
    return (wt + mat1 * col * wt * s).T


def test_spp_is_authors_diagonal_linear_in_float64():
    rng = np.random.default_rng(0)
    n_in, n_out, r = 6, 8, 4
    w = rng.standard_normal((n_in, n_out))
    w[rng.random(w.shape) < 0.5] = 0.0
    x = rng.standard_normal((3, n_in))
    with jax.enable_x64(True):
        ad = adapters.spp(r, param_dtype=jnp.float64)
        t = adapters.SPPParams(jnp.asarray(rng.standard_normal((n_in, r))),
                               jnp.asarray(rng.standard_normal(n_out)))
        want = ref_spp(w, t, None)
        got = np.asarray(ad.apply(jnp.asarray(w), t, None))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(jnp.asarray(got), t, None, None)),
                                   w, rtol=1e-12, atol=1e-12)
        # The authors' forward: x W^T + F.linear(x, (mat1 * col) * W) * scaling.
        wt = w.T
        mat1 = np.repeat(np.asarray(t.a).T, n_out // r, axis=0)
        y_authors = x @ wt.T + x @ ((mat1 * np.asarray(t.c)[:, None]) * wt).T * 2.0
        terms = ad.factored.terms(jnp.asarray(w), t, None)
        y = x @ w + np.asarray(terms.delta(jnp.asarray(x)))
        np.testing.assert_allclose(y, y_authors, rtol=1e-12, atol=1e-12)


def test_spp_matches_authors_code_golden():
    """scripts/golden/spp_make.py: the authors' Linear (r=8, alpha=16: 16 rows, scale 2)."""
    g = np.load(GOLDEN)
    ad = adapters.spp()  # the defaults are the authors' setting
    for case in ("unstructured", "nm24"):
        w = jnp.asarray(g[f"{case}/W"].T)
        t = adapters.SPPParams(jnp.asarray(g[f"{case}/weight"].T),
                               jnp.asarray(g[f"{case}/weight_col"][:, 0]))
        merged = np.asarray(ad.apply(w, t, None))
        np.testing.assert_allclose(merged, g[f"{case}/merged"].T, **h.MATMUL_F32)
        np.testing.assert_array_equal(merged != 0, g[f"{case}/W"].T != 0)
        x = jnp.asarray(g[f"{case}/x"])
        y = h.f64(x @ w) + h.f64(ad.factored.terms(w, t, None).delta(x))
        np.testing.assert_allclose(y, g[f"{case}/y"], rtol=1e-5, atol=1e-5)


def test_spp_keeps_mask_and_n_m_pattern_through_training(getkey):
    rng = np.random.default_rng(3)
    w, mask = adapters.dsee_prune(jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
                                  n_m=(2, 4))
    ad = adapters.spp(2)
    t, f = ad.init(getkey(), w)
    assert not np.any(np.asarray(t.c))
    bound = 1 / np.sqrt(8)
    assert np.abs(h.f64(t.a)).max() <= bound
    x = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    opt = optax.adam(0.1)
    state = opt.init(t)

    @jax.jit
    def step(t, state):
        loss, g = jax.value_and_grad(lambda tt: jnp.mean((x @ ad.apply(w, tt, f) - y) ** 2))(t)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int/float
            u, state = opt.update(g, state, t)
            return optax.apply_updates(t, u), state, loss

    losses = []
    for _ in range(10):
        t, state, loss = step(t, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    merged = np.asarray(ad.apply(w, t, f))
    np.testing.assert_array_equal(merged != 0, np.asarray(mask))
    assert np.all((merged.reshape(2, 4, 4) != 0).sum(axis=1) == 2)  # 2:4 per group
    assert not np.allclose(merged, np.asarray(w))


def test_spp_count_and_errors():
    # SmolLM2-135M q, k, v, o at the default r = 16: r·in + out per matrix
    ad = adapters.spp()
    n = [ad.num_trainable(jax.ShapeDtypeStruct(s, jnp.float32))
         for s in ((576, 576), (576, 192), (576, 192), (576, 576))]
    assert n == [16 * 576 + 576, 16 * 576 + 192, 16 * 576 + 192, 16 * 576 + 576]
    with pytest.raises(ValueError, match=r"out=5 .*\(6, 5\).*rank=2"):
        adapters.spp(2).init(jax.random.key(0), jnp.zeros((6, 5)))
    with pytest.raises(ValueError, match="scale"):
        adapters.spp(2, scale=float("nan"))
