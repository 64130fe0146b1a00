"""KaSA (peftjax.adapters.kasa): PEFT's KasaLinearVariant in torch layout (the SVD
truncation of the base plus ``s·B diag(d) A``), PEFT's init, exact unfold, the
factored form (input projection + update) and PEFT's ``_get_kasa_loss``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def ref_kasa(w, t, f, *, s):
    """float64 PEFT: truncate ``W (out, in)`` by its ``r`` smallest singular
    components, add ``s·(B·d) A``; returned in Flax layout."""
    wt = h.f64(w).T
    r = np.shape(t.diag)[-1]
    u, sv, vh = np.linalg.svd(wt, full_matrices=False)
    k = sv.size - r
    trunc = (u[:, :k] * sv[:k]) @ vh[:k]
    a_t, b_t = h.f64(t.a).T, h.f64(t.b).T  # lora_A (r, in), lora_B (out, r)
    return (trunc + s * (b_t * h.f64(t.diag)) @ a_t).T


def _peft_kasa_loss(a_t, b_t, d, beta, gamma):
    eye = np.eye(d.size)
    return beta * (d ** 2).sum() + gamma * (np.linalg.norm(b_t.T @ b_t - eye)
                                            + np.linalg.norm(a_t @ a_t.T - eye))


def test_kasa_is_peft_variant_in_float64_with_factored_form_and_unfold():
    rng = np.random.default_rng(0)
    n_in, n_out, r = 7, 5, 2
    w = rng.standard_normal((n_in, n_out))
    x = rng.standard_normal((3, n_in))
    with jax.enable_x64(True):
        ad = adapters.kasa(r, alpha=6.0, param_dtype=jnp.float64)
        t, f = ad.init(jax.random.key(0), jnp.asarray(w))
        t = adapters.KaSAParams(*(jnp.asarray(rng.standard_normal(np.shape(v)))
                                  for v in t))
        want = ref_kasa(w, t, f, s=3.0)
        got = ad.apply(jnp.asarray(w), t, f)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(np.asarray(ad.unapply(got, t, f, None)), w,
                                   rtol=1e-11, atol=1e-11)
        terms = ad.factored.terms(jnp.asarray(w), t, f)
        y = np.asarray(terms.in_map(jnp.asarray(x))) @ w + np.asarray(
            terms.delta(jnp.asarray(x)))
        np.testing.assert_allclose(y, x @ want, rtol=1e-11, atol=1e-11)
    # The truncated base has rank min(in, out) - r; U_d orthonormal.
    trunc = ref_kasa(w, t._replace(b=jnp.zeros_like(t.b)), f, s=3.0)
    assert np.linalg.matrix_rank(trunc, tol=1e-9) == n_out - r
    np.testing.assert_allclose(h.f64(f.u).T @ h.f64(f.u), np.eye(r), atol=1e-12)


def test_kasa_init_is_peft_and_refuses_full_rank(getkey):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((16, 12)), jnp.float32)
    t, f = adapters.kasa(4).init(getkey(), w)
    assert float(jnp.abs(t.b).max()) == 0.0
    assert 0.7 / 4 < float(jnp.abs(t.a).max()) <= 1 / 4  # kaiming-uniform, fan-in 16
    assert float(jnp.std(t.diag)) > 0.1  # torch.randn
    assert f.u.shape == (16, 4) and f.dropped.shape == (4, 12)
    with pytest.raises(ValueError, match=r"rank=4 must be < min\(in, out\)=4"):
        adapters.kasa(4).init(getkey(), jnp.ones((4, 6)))
    with pytest.raises(ValueError, match="gamma"):
        adapters.kasa(2, gamma=-1.0)


def test_kasa_loss_is_peft_get_kasa_loss_per_layer():
    params = {"q": jnp.zeros((3, 6, 5)), "v": jnp.zeros((5, 4))}
    a = tree.assign(params, [
        tree.Rule(where="q", then=adapters.kasa(2, beta=0.5, gamma=0.25)
                  .with_dimension_numbers(tree.dims.stacked())),
        tree.Rule(where="v", then=adapters.lora(2))])
    rng = np.random.default_rng(3)
    t = {"q": adapters.KaSAParams(*(jnp.asarray(rng.standard_normal(s), jnp.float32)
                                    for s in ((3, 6, 2), (3, 2, 5), (3, 2)))),
         "v": adapters.LoRAParams(jnp.ones((5, 2)), jnp.ones((2, 4)))}
    want = sum(_peft_kasa_loss(h.f64(t["q"].a[i]).T, h.f64(t["q"].b[i]).T,
                               h.f64(t["q"].diag[i]), 0.5, 0.25) for i in range(3))
    got, g = jax.value_and_grad(lambda tt: adapters.kasa_loss(a, tt))(t)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g["q"]))
    with pytest.raises(ValueError, match="not a kasa"):
        adapters.kasa_loss({"q": adapters.lora(2)}, {"q": t["q"]})
