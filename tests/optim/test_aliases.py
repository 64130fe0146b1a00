"""The optax-style aliases ``adamw_hf`` and ``sora`` against float64 references.

References are written here in numpy from the update rules as the reference
implementations state them: Hugging Face's legacy ``AdamW.step`` (galore-torch's
``adamw.py`` is the same loop: bias-corrected step size, ``eps`` added to
``sqrt(v)``, then ``p -= lr * wd * p`` on the new weights) and SoRA's recipe
(torch ``AdamW`` with ``eps`` added to ``sqrt(v_hat)`` and the gates exempt from
weight decay, then the soft-threshold ``lr * lambda`` on the gates).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import optim
from tests.helpers import ELEMENTWISE_F32

# optax's Adam forms 1 - b2**t in float32: for b2 = 0.999 that difference
# carries a relative error of ~1.3e-5 (0.999 is not exact in float32), ~6e-6
# after the square root: each step (at most lr = 0.1 per element here) is off
# by up to ~1.3e-6, three steps by up to ~4e-6.
OPTAX_ADAM_F32 = dict(rtol=1e-5, atol=5e-6)

RNG = np.random.default_rng(7)
P0 = RNG.standard_normal((4, 3))
GRADS = [RNG.standard_normal((4, 3)) for _ in range(3)]


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax.adamw (the reference here, and inside sora) mixes weak floats.
    with jax.numpy_dtype_promotion("standard"):
        yield


def _hf_adamw(p, grads, lr, b1, b2, eps, wd):
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - step * m / (np.sqrt(v) + eps)
        p = p - lr * wd * p
    return p


def _run(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    return params


def test_adamw_hf_matches_the_hf_loop():
    lr, b1, b2, eps, wd = 0.05, 0.9, 0.99, 1e-3, 0.5
    got = _run(optim.adamw_hf(lr, b1, b2, eps, wd), {"w": jnp.asarray(P0, jnp.float32)},
               [{"w": jnp.asarray(g, jnp.float32)} for g in GRADS])
    want = _hf_adamw(P0, GRADS, lr, b1, b2, eps, wd)
    np.testing.assert_allclose(np.asarray(got["w"], np.float64), want, **ELEMENTWISE_F32)
    # optax.adamw decays the old weights inside the step: a different result
    other = _run(optax.adamw(lr, b1, b2, eps, weight_decay=wd),
                 {"w": jnp.asarray(P0, jnp.float32)},
                 [{"w": jnp.asarray(g, jnp.float32)} for g in GRADS])
    assert np.max(np.abs(np.asarray(other["w"], np.float64) - want)) > 1e-4


def _sora_ref(a, gate, ga, gg, lr, lam, b1, b2, eps, wd):
    ma, va = np.zeros_like(a), np.zeros_like(a)
    mg, vg = np.zeros_like(gate), np.zeros_like(gate)
    for t, (xa, xg) in enumerate(zip(ga, gg, strict=True), start=1):
        ma, va = b1 * ma + (1 - b1) * xa, b2 * va + (1 - b2) * xa * xa
        mg, vg = b1 * mg + (1 - b1) * xg, b2 * vg + (1 - b2) * xg * xg
        c1, c2 = 1 - b1**t, 1 - b2**t
        a = a * (1 - lr * wd) - lr * (ma / c1) / (np.sqrt(va / c2) + eps)
        z = gate - lr * (mg / c1) / (np.sqrt(vg / c2) + eps)
        gate = np.sign(z) * np.maximum(np.abs(z) - lr * lam, 0.0)
    return a, gate


def test_sora_is_adamw_without_gate_decay_then_the_prox():
    lr, lam, b1, b2, eps, wd = 0.1, 1.5, 0.9, 0.999, 1e-8, 0.2
    a0 = RNG.standard_normal(5)
    g0 = np.array([1.0, 0.12, -0.5, 0.05])
    ga = [RNG.standard_normal(5) for _ in range(3)]
    gg = [np.array([0.5, 1.0, -0.2, 0.01]) * s for s in (1.0, 0.5, 2.0)]
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got = _run(optim.sora(lr, lam, b1=b1, b2=b2, eps=eps, weight_decay=wd),
               {"q": {"a": f(a0), "gate": f(g0)}},
               [{"q": {"a": f(x), "gate": f(y)}} for x, y in zip(ga, gg, strict=True)])
    want_a, want_g = _sora_ref(a0, g0, ga, gg, lr, lam, b1, b2, eps, wd)
    np.testing.assert_allclose(np.asarray(got["q"]["a"], np.float64), want_a,
                               **OPTAX_ADAM_F32)
    np.testing.assert_allclose(np.asarray(got["q"]["gate"], np.float64), want_g,
                               **OPTAX_ADAM_F32)
    assert np.sum(want_g == 0) >= 1  # the prox zeroed a gate
    np.testing.assert_array_equal(np.asarray(got["q"]["gate"])[want_g == 0], 0.0)
