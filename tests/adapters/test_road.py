"""RoAd (peftjax.adapters.road): PEFT's rotation matrix in torch layout for the three
variants, the bias, the closed-form unfold, init, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from peftjax.tree import dims
from tests import helpers as h


def _peft_matrix(variant, group, theta, alpha):
    """float64 PEFT ``_get_delta_weight``: the ``(out, out)`` matrix ``R``, built by hand."""
    n = {"road_1": 2 * theta.size, "road_2": theta.size, "road_4": theta.size // 2}[variant]
    half = group // 2
    rot = np.zeros((n, n))
    for i in range(n):  # output i pairs with j in the other half of its group
        g, k = divmod(i, group)
        first = k < half
        j = g * group + (k + half if first else k - half)
        if variant == "road_1":
            p = g * half + (k if first else k - half)
            a1 = a2 = alpha[p]
            c, s = np.cos(theta[p]), np.sin(theta[p])
        elif variant == "road_2":
            a1 = a2 = alpha[i]
            c, s = np.cos(theta[i]), np.sin(theta[i])
        else:
            a1, a2 = alpha[2 * g * group + k], alpha[2 * g * group + group + k]
            c, s = np.cos(theta[2 * g * group + k]), np.sin(theta[2 * g * group + group + k])
        rot[i, i] = a1 * c
        rot[i, j] = -a2 * s if first else a2 * s
    return rot


def ref_road(w, t, f, variant="road_1", group=4):
    """float64 ``W' = W0 Rᵀ`` (Flax layout of PEFT's merged ``R W``)."""
    rot = _peft_matrix(variant, group, h.f64(t.theta), h.f64(t.alpha))
    return h.f64(w) @ rot.T


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_road_is_peft_rotation_in_float64(variant):
    rng = np.random.default_rng(0)
    n_in, n_out, group = 5, 8, 4
    size = {"road_1": 4, "road_2": 8, "road_4": 16}[variant]
    theta, alpha = rng.standard_normal(size), 1 + 0.3 * rng.standard_normal(size)
    w_t, b = rng.standard_normal((n_out, n_in)), rng.standard_normal(n_out)
    x = rng.standard_normal((3, n_in))
    rot = _peft_matrix(variant, group, theta, alpha)
    with jax.enable_x64(True):
        ad = adapters.road(variant, group_size=group, param_dtype=jnp.float64)
        t = adapters.RoAdParams(jnp.asarray(theta), jnp.asarray(alpha))
        got = ad.apply(jnp.asarray(w_t.T), t, None)
        np.testing.assert_allclose(np.asarray(got), (rot @ w_t).T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(got, t, None, None)), w_t.T,
                                   rtol=1e-10, atol=1e-10)
        bias = ad.bias.apply((n_in, n_out), jnp.asarray(b), t, None)
        np.testing.assert_allclose(np.asarray(bias), rot @ b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.bias.unapply((n_in, n_out), bias, t, None)), b,
                                   rtol=1e-10, atol=1e-10)
        terms = ad.factored.terms(jnp.asarray(w_t.T), t, None)
        assert terms.delta is None and terms.in_map is None
        y = np.asarray(terms.out_map(jnp.asarray(x @ w_t.T)))  # R(x W0), one base product
        np.testing.assert_allclose(y, x @ (rot @ w_t).T, rtol=1e-12, atol=1e-12)


def test_road_init_is_peft_default(getkey):
    w = jnp.ones((3, 8))
    for variant, size in (("road_1", 4), ("road_2", 8), ("road_4", 16)):
        t, f = adapters.road(variant, group_size=4).init(getkey(), w)
        assert f is None and t.theta.shape == t.alpha.shape == (size,)
        np.testing.assert_array_equal(np.asarray(t.theta), 0.0)
        np.testing.assert_array_equal(np.asarray(t.alpha), 1.0)
    t, _ = adapters.road("road_2", group_size=4, init_weights=False).init(getkey(), w)
    assert np.std(h.f64(t.theta)) > 0.1 and abs(np.mean(h.f64(t.alpha)) - 1) < 0.6


def test_road_stacked_tree_fold_unfold_and_gradient(getkey):
    # A stacked kernel with a bias through the tree verbs, per layer equal to
    # the reference (bias included).
    rng = np.random.default_rng(3)
    params = {"lin": {"kernel": jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)}}
    ad = adapters.road("road_4", group_size=2, dimension_numbers=dims.stacked())
    a = tree.assign(params, [tree.Rule(where="lin/kernel", then=ad)])
    st = adapters.init(a, getkey(), params)
    t = adapters.RoAdParams(jnp.asarray(rng.standard_normal((2, 8)), jnp.float32),
                            jnp.asarray(1 + 0.3 * rng.standard_normal((2, 8)), jnp.float32))
    tr = {"lin/kernel": t}
    folded, aux = jax.jit(lambda tt: adapters.fold(a, params, tt, st.frozen,
                                                   return_aux=True))(tr)
    for layer in range(2):
        tl = adapters.RoAdParams(t.theta[layer], t.alpha[layer])
        np.testing.assert_allclose(h.f64(folded["lin"]["kernel"][layer]),
                                   ref_road(params["lin"]["kernel"][layer], tl, None,
                                            "road_4", 2), **h.MATMUL_F32)
        rot = _peft_matrix("road_4", 2, h.f64(tl.theta), h.f64(tl.alpha))
        np.testing.assert_allclose(h.f64(folded["lin"]["bias"][layer]),
                                   rot @ h.f64(params["lin"]["bias"][layer]), **h.MATMUL_F32)
    back = adapters.unfold(a, folded, tr, st.frozen, aux=aux)
    h.assert_tree_allclose(back, params, **h.MATMUL_F32)
    g = jax.grad(lambda tt: jnp.sum(
        adapters.materialize(a, params, tt, st.frozen)["lin"]["kernel"]))(tr)
    assert all(bool(jnp.all(jnp.isfinite(x))) and float(jnp.abs(x).max()) > 0
               for x in jax.tree.leaves(g))


def test_road_errors():
    with pytest.raises(ValueError, match="variant"):
        adapters.road("road_3")
    with pytest.raises(ValueError, match="group_size"):
        adapters.road(group_size=3)
    with pytest.raises(TypeError, match="init_weights"):
        adapters.road(init_weights=1)
    with pytest.raises(ValueError, match=r"output width 6.*\(3, 6\).*group_size=4"):
        adapters.road(group_size=4).init(jax.random.key(0), jnp.ones((3, 6)))
