"""GLoRA (peftjax.adapters.glora): PEFT's merged weight and bias in torch layout for
every path choice, exact unfold, the factored form, PEFT's init and the bias rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored
from tests import helpers as h


def _torch_paths(t):
    """PEFT's A, B (out, in)-broadcastable, C (in, 1), D, E from GLoRAParams (float64)."""
    def ab(name):
        whole = getattr(t, name)
        if whole is not None:
            return h.f64(whole)[:, None] if whole.shape[0] > 1 else h.f64(whole)
        lo = getattr(t, name + "_in")
        if lo is None:
            return 0.0
        xd, xu = h.f64(getattr(t, name + "_out")).T, h.f64(lo).T  # (out, r), (r, in)
        return xd @ xu

    if t.c is not None:
        c = h.f64(t.c)[:, None]
    elif t.c_in is not None:
        c = h.f64(t.c_in) @ h.f64(t.c_out)[:, None]
    else:
        c = None
    d = 0.0 if t.d is None else h.f64(t.d)
    e = 0.0 if t.e is None else h.f64(t.e)
    return ab("a"), ab("b"), c, d, e


def ref_glora(w, t, f):
    """float64 PEFT ``W0 + W0 * A + B`` (torch layout), returned in Flax layout."""
    a, b, _, _, _ = _torch_paths(t)
    w_t = h.f64(w).T
    return (w_t + w_t * a + b).T


def ref_glora_bias(w, bias, t):
    """float64 PEFT ``b0 + b0 * D + E + W0 @ C``."""
    _, _, c, d, e = _torch_paths(t)
    b0 = h.f64(bias)
    out = b0 + b0 * d + e
    return out if c is None else out + (h.f64(w).T @ c)[:, 0]


CONFIGS = [("lora", "lora", "constant"), ("vector", "vector", "vector"),
           ("constant", "none", "none"), ("none", "lora", "vector")]


@pytest.mark.parametrize("ab,c,de", CONFIGS)
def test_glora_is_peft_merge_in_float64(ab, c, de):
    rng = np.random.default_rng(0)
    n_in, n_out, r = 7, 5, 3
    w = rng.standard_normal((n_in, n_out))
    bias = rng.standard_normal(n_out)
    x = rng.standard_normal((4, n_in))
    with jax.enable_x64(True):
        ad = adapters.glora(r, config_A_B=ab, config_C=c, config_D_E=de,
                            init_weights=False, param_dtype=jnp.float64)
        t, _ = ad.init(jax.random.key(0), jnp.asarray(w))
        t = jax.tree.map(lambda v: v + 0.3 * jnp.asarray(rng.standard_normal(v.shape)), t)
        want_w, want_b = ref_glora(w, t, None), ref_glora_bias(w, bias, t)
        got = ad.apply(jnp.asarray(w), t, None)
        np.testing.assert_allclose(np.asarray(got), want_w, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(got, t, None, None)), w,
                                   rtol=1e-10, atol=1e-10)
        if ad.bias is not None:
            got_b = ad.bias.apply(w.shape, jnp.asarray(bias), t, None, jnp.asarray(w))
            np.testing.assert_allclose(np.asarray(got_b), want_b, rtol=1e-12, atol=1e-12)
            back = ad.bias.unapply(w.shape, got_b, t, None, jnp.asarray(w))
            np.testing.assert_allclose(np.asarray(back), bias, rtol=1e-10, atol=1e-10)
        else:
            np.testing.assert_array_equal(want_b, bias)
        terms = ad.factored.terms(jnp.asarray(w), t, None)
        y = x @ w
        if terms.delta is not None:
            y = y + np.asarray(terms.delta(jnp.asarray(x)))
        if terms.out_scale is not None:
            y = y * np.asarray(terms.out_scale)
        np.testing.assert_allclose(y, x @ want_w, rtol=1e-10, atol=1e-10)
        n_trainable = ad.num_trainable(jnp.zeros((n_in, n_out)))
    counts = {"lora": r * (n_in + n_out), "vector": n_out, "constant": 1, "none": 0}
    want_n = 2 * counts[ab] + {"lora": r * (n_in + 1), "vector": n_in, "none": 0}[c]
    want_n += 2 * {"vector": n_out, "constant": 1, "none": 0}[de]
    assert n_trainable == want_n


def test_glora_init_is_peft_default(getkey):
    w = jnp.zeros((64, 48))
    t, _ = jax.jit(adapters.glora(4).init)(getkey(), w)
    for lo in (t.a_in, t.b_in):  # Xu: kaiming-uniform, U(±1/sqrt(in))
        assert 0.8 / 8 < float(jnp.abs(lo).max()) <= 1 / 8
    for z in (t.a_out, t.b_out, t.c_in, t.d, t.e):
        assert not np.any(np.asarray(z))
    assert float(jnp.abs(t.c_out).min()) > 0 and float(jnp.abs(t.c_out).max()) <= 1.0
    t, _ = jax.jit(adapters.glora(4, config_A_B="vector", config_D_E="vector",
                                  init_weights=False).init)(getkey(), w)
    assert 0.5 < float(jnp.abs(t.a).max()) <= 1.0
    assert 0.8 / np.sqrt(48) < float(jnp.abs(t.d).max()) <= 1 / np.sqrt(48)
    assert t.a.shape == (48,) and t.c_in.shape == (64, 4) and t.c_out.shape == (4,)


def test_glora_bias_paths_need_a_bias_and_run_factored(getkey):
    rng = np.random.default_rng(2)
    params = {"l": {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal(5), jnp.float32)},
              "n": {"kernel": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)}}
    with pytest.raises(ValueError, match="n/bias"):
        adapters.init({"n/kernel": adapters.glora(2)}, getkey(), params)
    with pytest.raises(ValueError, match="config_C must be one of"):
        adapters.glora(2, config_C="constant")
    a = {"l/kernel": adapters.glora(2, config_A_B="vector", config_D_E="vector"),
         "n/kernel": adapters.glora(2, config_C="none", config_D_E="none")}
    st = adapters.init(a, getkey(), params)
    st = st._replace(trainable=jax.tree.map(
        lambda v: v + 0.3 * jnp.asarray(rng.standard_normal(v.shape), v.dtype),
        st.trainable))
    x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)

    def model(p, x):
        hid = x @ p["l"]["kernel"] + p["l"]["bias"][None, :]
        return hid @ p["n"]["kernel"]

    m = jax.jit(lambda t, f: adapters.materialize(a, params, t, f))(*st)
    tl = st.trainable["l/kernel"]
    np.testing.assert_allclose(h.f64(m["l"]["bias"]),
                               ref_glora_bias(params["l"]["kernel"], params["l"]["bias"], tl),
                               **h.MATMUL_F32)
    got = jax.jit(lambda t, f: factored.transform(model, a, t, f)(params, x))(*st)
    np.testing.assert_allclose(h.f64(got), h.f64(model(m, x)), **h.MATMUL_F32)
    back = jax.jit(lambda t, f: adapters.unfold(a, adapters.fold(a, params, t, f), t, f))(
        *st)
    h.assert_tree_allclose(back, params, **h.MATMUL_F32)
