"""SALT (peftjax.adapters.salt): the authors' ``SALTLinear`` forward and ``reg_loss``
(goldens from scripts/golden/salt_make.py), the exact identity at init, the SVD
basis, the rank rule and exact unfold."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "salt" / "salt_authors.npz"


def ref_salt(w, t, f):
    """float64 ``W' = W0 + U(ReLU(Σ') - Σ)Vᵀ`` on the frozen basis (Flax layout)."""
    u, s, vt = h.f64(f.u), h.f64(f.s), h.f64(f.vt)
    r = np.shape(t.scale)[-1]
    m = np.diag(s)
    m[:r, :r] = np.diag(h.f64(t.scale) * s[:r] + h.f64(t.shift))
    m[r:, r:] += h.f64(t.x) @ h.f64(t.y)
    return h.f64(w) + u @ (np.maximum(m, 0) - np.diag(s)) @ vt


@pytest.mark.parametrize("case", ["wide", "tall"])
def test_salt_matches_authors_salt_linear(case):
    g = {k.split("/", 1)[1]: v for k, v in np.load(GOLDEN).items() if k.startswith(case)}
    w = g["w"].T  # Flax (in, out)
    ad = adapters.salt(float(g["ratio"]), lora_rank=int(g["r_lora"]))
    t0, _ = ad.init(jax.random.key(0), jnp.asarray(w))
    assert t0.scale.shape == g["scale"].shape and t0.y.shape == g["X"].T.shape
    # the authors' singular vectors (arbitrary signs), in Flax layout
    f = adapters.SALTBasis(jnp.asarray(g["vt"].T), jnp.asarray(g["s"]), jnp.asarray(g["u"].T))
    t = adapters.SALTParams(*(jnp.asarray(g[k]) for k in ("scale", "shift")),
                            x=jnp.asarray(g["Y"].T), y=jnp.asarray(g["X"].T))
    got = h.f64(g["x"]) @ h.f64(ad.apply(jnp.asarray(w), t, f))
    np.testing.assert_allclose(got, g["y"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(got, h.f64(g["x"]) @ ref_salt(w, t, f), atol=2e-5)
    loss = adapters.salt_loss({"w": t}, {"w": f})
    np.testing.assert_allclose(float(loss), float(g["reg_loss"]), rtol=1e-5)


def test_salt_init_is_identity_on_an_svd_basis_and_unfolds(getkey):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((12, 9)), jnp.float32)
    ad = adapters.salt()  # r = max(1, int(0.1 * 9)) = 1, r_lora 8
    t, f = ad.init(getkey(), w)
    assert (t.scale.shape, t.x.shape, t.y.shape) == ((1,), (8, 8), (8, 8))
    np.testing.assert_array_equal(np.asarray(ad.apply(w, t, f)), np.asarray(w))
    assert float(jnp.abs(t.x).max()) == 0.0
    assert np.sqrt(6 / 8) * 0.8 < float(jnp.abs(t.y).max()) <= np.sqrt(6 / 8)
    np.testing.assert_allclose(h.f64(f.u) * h.f64(f.s) @ h.f64(f.vt), h.f64(w), atol=1e-5)
    np.testing.assert_allclose(h.f64(f.u).T @ h.f64(f.u), np.eye(9), atol=1e-5)
    t = jax.tree.map(lambda v: v + 0.3, t)
    w2 = ad.apply(w, t, f)
    np.testing.assert_allclose(h.f64(w2), ref_salt(w, t, f), **h.MATMUL_F32)
    np.testing.assert_allclose(h.f64(ad.unapply(w2, t, f, None)), h.f64(w), atol=1e-5)
    assert ad.num_trainable(w) == 2 * 1 + 2 * 8 * 8
    assert adapters.salt_rank(0.1, 576, 192) == 19
    with pytest.raises(ValueError, match=r"r=9 >= min\(in, out\)=9"):
        adapters.salt(9).init(getkey(), w)
    with pytest.raises(ValueError, match="ratio in"):
        adapters.salt(1.5)
