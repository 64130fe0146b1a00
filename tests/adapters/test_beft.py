"""BEFT (adapters.beft): float64 references, factored path, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored
from tests import helpers as h


def ref_beft(w, t, f):
    """The kernel is unchanged (the shift is on the bias leaf)."""
    return h.f64(w)


def _params():
    rng = np.random.default_rng(0)
    return {"l": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
                  "bias": jnp.asarray(rng.standard_normal(3), jnp.float32)}}


def test_beft_shifts_the_bias_in_both_paths_and_unfolds(getkey):
    p = _params()
    a = {"l/kernel": adapters.beft()}
    st = adapters.init(a, getkey(), p)
    assert h.f64(st.trainable["l/kernel"].shift).tolist() == [0.0, 0.0, 0.0]
    beta = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
    st = adapters.AdapterState({"l/kernel": adapters.BEFTParams(beta)}, st.frozen)
    m = adapters.materialize(a, p, *st)
    np.testing.assert_array_equal(np.asarray(m["l"]["kernel"]), np.asarray(p["l"]["kernel"]))
    np.testing.assert_allclose(h.f64(m["l"]["bias"]), h.f64(p["l"]["bias"]) + h.f64(beta),
                               **h.ELEMENTWISE_F32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4)), jnp.float32)
    want = h.f64(x) @ h.f64(p["l"]["kernel"]) + h.f64(p["l"]["bias"]) + h.f64(beta)
    fwd = factored.transform(lambda q, x: x @ q["l"]["kernel"] + q["l"]["bias"][None, :],
                             a, *st)
    np.testing.assert_allclose(h.f64(fwd(p, x)), want, **h.MATMUL_F32)
    back = adapters.unfold(a, adapters.fold(a, p, *st), *st)
    np.testing.assert_allclose(h.f64(back["l"]["bias"]), h.f64(p["l"]["bias"]),
                               **h.ELEMENTWISE_F32)


def test_beft_errors(getkey):
    with pytest.raises(ValueError, match="l/kernel.*no leaf 'l/bias'"):
        adapters.init({"l/kernel": adapters.beft()}, getkey(),
                      {"l": {"kernel": jnp.ones((4, 3))}})
    with pytest.raises(TypeError, match="init_weights"):
        adapters.beft(init_weights=1)
    t, _ = adapters.beft(init_weights=False).init(jax.random.key(0), jnp.ones((4, 3)))
    assert np.abs(h.f64(t.shift)).max() > 0  # PEFT's randn start
