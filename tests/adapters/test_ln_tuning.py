"""LN tuning (adapters.ln_tuning) on the norm leaves of a tiny pre-norm block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h

D, L = 4, 3


def _params():
    rng = np.random.default_rng(0)
    return {
        "layers": {  # stacked layers, as the scanned layouts hold them
            "norm": {"scale": jnp.asarray(1 + 0.1 * rng.standard_normal((L, D)), jnp.float32)},
            "mlp": {"kernel": jnp.asarray(0.5 * rng.standard_normal((L, D, D)), jnp.float32)},
        },
        "final_norm": {"scale": jnp.ones((D,), jnp.float32),
                       "bias": jnp.zeros((D,), jnp.float32)},
    }


def _model(p, x):
    for i in range(L):
        g = p["layers"]["norm"]["scale"][i][None, :]
        hdn = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g
        x = x + hdn @ p["layers"]["mlp"]["kernel"][i]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    fn = p["final_norm"]
    return (x - mu) / jnp.sqrt(var + 1e-6) * fn["scale"][None, :] + fn["bias"][None, :]


def _ref(p, x, gains, fscale, fbias):
    """The same model in float64 numpy with the trained norm values."""
    x = h.f64(x)
    k = h.f64(p["layers"]["mlp"]["kernel"])
    for i in range(L):
        hdn = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * gains[i]
        x = x + hdn @ k[i]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * fscale + fbias


def _assign(params):
    return tree.assign(params, [
        tree.Rule(where=r".*norm/(scale|bias)", then=adapters.ln_tuning())])


def test_trained_norms_match_float64_model(getkey):
    params = _params()
    a = _assign(params)
    state = adapters.init(a, getkey(), params)
    assert sorted(state.trainable) == ["final_norm/bias", "final_norm/scale",
                                       "layers/norm/scale"]
    # PEFT's count: one copy of every norm parameter.
    assert adapters.num_trainable(state.trainable) == L * D + 2 * D
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, D)), jnp.float32)
    y0 = _model(adapters.materialize(a, params, *state), x)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(_model(params, x)))
    rng = np.random.default_rng(2)
    trained = {k: adapters.LNTuningParams(v.value + jnp.asarray(
        0.3 * rng.standard_normal(v.value.shape), jnp.float32))
        for k, v in state.trainable.items()}
    y = _model(adapters.materialize(a, params, trained, state.frozen), x)
    want = _ref(params, x, h.f64(trained["layers/norm/scale"].value),
                h.f64(trained["final_norm/scale"].value),
                h.f64(trained["final_norm/bias"].value))
    assert np.abs(want - h.f64(_model(params, x))).max() > 0.1  # not the identity
    np.testing.assert_allclose(h.f64(y), want, rtol=1e-5, atol=1e-5)
    # Gradients reach exactly the trainable copies and match the model's own.
    gt = jax.grad(lambda t: _model(adapters.materialize(a, params, t, state.frozen),
                                   x).sum())(trained)
    m = adapters.materialize(a, params, trained, state.frozen)
    gp = jax.grad(lambda p: _model(p, x).sum())(m)
    np.testing.assert_allclose(h.f64(gt["layers/norm/scale"].value),
                               h.f64(gp["layers"]["norm"]["scale"]), **h.MATMUL_F32)
    np.testing.assert_allclose(h.f64(gt["final_norm/bias"].value),
                               h.f64(gp["final_norm"]["bias"]), **h.MATMUL_F32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fold_unfold_exact(dtype, getkey):
    params = jax.tree.map(lambda v: v.astype(dtype), _params())
    a = _assign(params)
    state = adapters.init(a, getkey(), params)
    trained = jax.tree.map(lambda v: v * 1.5 + 0.25, state.trainable)
    merged, aux = adapters.fold(a, params, trained, state.frozen, return_aux=True)
    np.testing.assert_array_equal(
        h.f64(merged["layers"]["norm"]["scale"]),
        h.f64(trained["layers/norm/scale"].value.astype(dtype)))
    back = adapters.unfold(a, merged, trained, state.frozen, aux=aux)
    h.assert_tree_allclose(back, params, **h.EXACT)
    with pytest.raises(ValueError, match="ln_tuning: trainable value has shape"):
        adapters.ln_tuning().apply(jnp.ones((3,)), adapters.LNTuningParams(jnp.ones((4,))),
                                   None)
