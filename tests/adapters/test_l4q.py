"""L4Q (adapters.l4q): the paper's quantiser in float64, LSQ's gradients, the integer export.

No runnable reference code was published with the paper; the reference is a
float64 transcription of §3's ``Q(W0 + s·A@B)`` and of LSQ's gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, quant
from tests import helpers as h


def _levels(bits, asym):
    return (0, 2 ** bits - 1) if asym else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def ref_l4q(w, t, f, *, s, bits=4, asym=False):
    """``α·clip(round((W0 + s·A@B - β)/α), Q_n, Q_p) + β`` per block, float64."""
    qn, qp = _levels(bits, asym)
    merged = h.f64(w) + s * h.f64(t.a) @ h.f64(t.b)
    step = h.f64(t.step)
    n_in, n_out = merged.shape
    bs = n_in // step.shape[0]
    alpha = np.repeat(step, bs, axis=0)
    beta = np.repeat(h.f64(t.offset), bs, axis=0) if asym else 0.0
    return np.clip(np.round((merged - beta) / alpha), qn, qp) * alpha + beta


def _randomize(t, seed=0):
    rng = np.random.default_rng(seed)
    return t._replace(a=jnp.asarray(rng.standard_normal(t.a.shape) * 0.3, jnp.float32),
                      b=jnp.asarray(rng.standard_normal(t.b.shape) * 0.3, jnp.float32))


@pytest.mark.parametrize("asym", [False, True])
def test_forward_matches_reference_and_init_is_rounding(asym):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((8, 6)), jnp.float32)
    ad = adapters.l4q(2, bits=3, block_size=4, asymmetric=asym, alpha=4.0)
    t, f = jax.jit(ad.init)(jax.random.key(0), w)
    assert t.step.shape == (2, 6) and t.offset.shape == ((2, 6) if asym else (0, 6))
    assert ad.num_trainable(w) == 2 * (8 + 6) + 12 * (2 if asym else 1)
    w0q = h.f64(jax.jit(ad.apply)(w, t, f))
    # At init (B = 0) W_q is W0 rounded to the nearest level of its block.
    alpha = np.repeat(h.f64(t.step), 4, axis=0)
    assert np.all(np.abs(w0q - h.f64(w)) <= alpha / 2 + 1e-6)
    beta = np.repeat(h.f64(t.offset), 4, axis=0) if asym else 0.0
    q = (w0q - beta) / alpha
    np.testing.assert_allclose(q, np.round(q), atol=1e-4)
    qn, qp = _levels(3, asym)
    assert q.min() >= qn - 1e-4 and q.max() <= qp + 1e-4
    t = _randomize(t)
    np.testing.assert_allclose(h.f64(jax.jit(ad.apply)(w, t, f)),
                               ref_l4q(w, t, f, s=2.0, bits=3, asym=asym), **h.MATMUL_F32)


@pytest.mark.parametrize("asym", [False, True])
def test_gradients_are_ste_and_lsq(asym):
    """∂A = s·(G⊙I)@Bᵀ, ∂B = s·Aᵀ@(G⊙I), ∂α = Σ G·(q - v·I)/sqrt(n·Q_p), ∂β = Σ G·(1 - I)."""
    bits, bs, s = 3, 4, 2.0
    w = jnp.asarray(np.random.default_rng(2).standard_normal((8, 5)), jnp.float32)
    ad = adapters.l4q(2, bits=bits, block_size=bs, asymmetric=asym, alpha=4.0)
    t, f = ad.init(jax.random.key(1), w)
    t = _randomize(t, seed=3)
    # Shrink the steps so that some weights fall outside the range (clipped).
    t = t._replace(step=t.step * 0.6)
    c = jnp.asarray(np.random.default_rng(4).standard_normal((8, 5)), jnp.float32)
    g = jax.jit(jax.grad(lambda tt: jnp.sum(ad.apply(w, tt, f) * c)))(t)
    qn, qp = _levels(bits, asym)
    merged = h.f64(w) + s * h.f64(t.a) @ h.f64(t.b)
    alpha = np.repeat(h.f64(t.step), bs, axis=0)
    beta = np.repeat(h.f64(t.offset), bs, axis=0) if asym else 0.0
    v = (merged - beta) / alpha
    inside = ((v >= qn) & (v <= qp)).astype(np.float64)
    assert 0 < inside.sum() < inside.size  # both branches exercised
    q = np.clip(np.round(v), qn, qp)
    gc = h.f64(c)
    np.testing.assert_allclose(h.f64(g.a), s * (gc * inside) @ h.f64(t.b).T, **h.MATMUL_F32)
    np.testing.assert_allclose(h.f64(g.b), s * h.f64(t.a).T @ (gc * inside), **h.MATMUL_F32)
    dstep = (gc * (q - v * inside)).reshape(2, bs, 5).sum(1) / np.sqrt(bs * qp)
    np.testing.assert_allclose(h.f64(g.step), dstep, **h.MATMUL_F32)
    if asym:
        np.testing.assert_allclose(h.f64(g.offset),
                                   (gc * (1 - inside)).reshape(2, bs, 5).sum(1),
                                   **h.MATMUL_F32)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_export_is_exact(bits):
    w = jnp.asarray(np.random.default_rng(5).standard_normal((8, 3)), jnp.float32)
    ad = adapters.l4q(2, bits=bits, block_size=4, alpha=4.0)
    t, f = ad.init(jax.random.key(2), w)
    t = _randomize(t, seed=6)
    codes, steps = adapters.l4q_codes(ad, w, t)
    qa = quant.from_codes(codes, steps, getattr(quant, f"int{bits}")(block_size=4), w.dtype)
    assert qa.shape == (8, 3) and qa.format.name == f"int{bits}"
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qa)),
                                  np.asarray(ad.apply(w, t, f)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        adapters.l4q(2, bits=1)
    with pytest.raises(TypeError, match="asymmetric"):
        adapters.l4q(2, asymmetric=1)
    with pytest.raises(ValueError, match=r"block_size=4 does not divide in=6.*\(6, 5\)"):
        adapters.l4q(2, block_size=4).init(jax.random.key(0), jnp.ones((6, 5)))
    with pytest.raises(ValueError, match="no integer-only form"):
        adapters.l4q_codes(adapters.l4q(2, bits=3), jnp.ones((128, 2)), None)
    with pytest.raises(ValueError, match="codes outside"):
        quant.from_codes(jnp.full((1, 2, 1), 9), jnp.ones((1, 1)), quant.int4(block_size=2),
                         jnp.float32)
