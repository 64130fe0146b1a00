"""Poly/MHR as a model hook (``adapters.PolyHook``): routing as PEFT's router,
task ids as data (one compile for every task), KV-cache generation equal to
repeated full passes, and argument errors. PEFT parity: tests/io/test_peft_poly.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from peftjax import models as pm
from peftjax.models import llama
from tests.io import tuner_checks as tc


def _model():
    """The committed tiny Llama (scanned), cached and shared with the IO tests."""
    g, params, _, _ = tc.load("llama", scanned=True)
    return pm.rebuild(g, params)


def _perturbed(pp, seed=0, scale=0.5):
    """NumPy draws of ``pp``'s shapes (``pp`` may be ``jax.eval_shape``'s)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * scale,
                                              x.dtype), pp)


def test_poly_weights_eval_and_train():
    z = jax.random.normal(jax.random.key(0), (3, 2 * 4))
    w = adapters.poly_weights(z, jnp.array([2, 0]), 2)
    p = 1 / (1 + np.exp(-np.asarray(z, np.float64)[[2, 0]].reshape(2, 2, 4)))
    np.testing.assert_allclose(w, p / (p.sum(-1, keepdims=True) + 1e-12), rtol=1e-6)
    ws = adapters.poly_weights(z, jnp.array([2, 0]), 2, jax.random.key(1))
    np.testing.assert_allclose(ws.sum(-1), 1.0, rtol=1e-5)
    assert float(jnp.abs(ws - w).max()) > 1e-3  # a sample, not the eval weights
    # relaxed-Bernoulli(T=1) sample mean of sigmoid(z + logistic noise): E > 0.5 for z=2
    s = adapters.poly_weights(jnp.array([[2.0, 0.0]]), jnp.zeros(4000, jnp.int32), 1,
                              jax.random.key(2))
    assert float(s[:, 0, 0].mean()) > 0.55


def test_poly_task_ids_are_data_and_generation_equals_full_passes():
    m = _model()
    gdef, params = pm.split_params(m)
    pp = _perturbed(jax.eval_shape(lambda: adapters.poly_init(
        jax.random.key(0), params, r=2, n_tasks=3, n_skills=2, n_splits=2,
        target_modules=["q_proj", "down_proj"])))
    toks = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)
    traces = []

    @jax.jit
    def f(pp, t, toks):
        traces.append(1)
        return pm.apply(gdef, params, toks, hooks=adapters.PolyHook(pp, t))

    a, b = f(pp, jnp.array([0, 1]), toks), f(pp, jnp.array([2, 2]), toks)
    assert len(traces) == 1 and float(jnp.abs(a - b).max()) > 1e-2
    # an example's output depends on its own task only
    np.testing.assert_allclose(a[1], f(pp, jnp.array([2, 1]), toks)[1], atol=1e-5)
    # KV-cache generation = greedy full passes: the full pass over the generated
    # sequence predicts each generated token (causal: teacher forcing = greedy)
    t = jnp.array([2, 0])
    got = llama.generate(m, toks, max_new_tokens=3, hooks=adapters.PolyHook(pp, t))
    seq = jnp.concatenate([toks, got], axis=1)
    full = f(pp, t, seq)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(full, -1))[:, 4:7])


def test_poly_init_errors():
    params = pm.split_params(_model())[1]
    with pytest.raises(ValueError, match="n_splits=3 does not divide self_attn/q_proj"):
        adapters.poly_init(jax.random.key(0), params, n_splits=3, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="match no projection"):
        adapters.poly_init(jax.random.key(0), params, target_modules=["nope"])
    with pytest.raises(ValueError, match="r=0 must be positive"):
        adapters.poly_init(jax.random.key(0), params, r=0, target_modules=["q_proj"])
