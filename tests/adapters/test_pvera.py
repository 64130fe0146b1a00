"""PVeRA (adapters.pvera): mean form, PEFT's sampled term, init and counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def ref_pvera(w, t, f):
    """``W + ΔW`` of PEFT's merge in float64: ``Λ_b B Λ_d[:r] A[:r]``, transposed to Flax.

    ``f`` holds the whole shared matrices; the matrix slices them as PEFT does.
    """
    r = f.b.shape[0]
    n_in, n_out = w.shape
    a_t = h.f64(f.a)[:n_in].T  # torch A[:, :in] (2r, in)
    b_t = h.f64(f.b)[:, :n_out].T  # torch B[:out] (out, r)
    lam_d, lam_b = h.f64(t.lambda_d), h.f64(t.lambda_b)
    delta_torch = (lam_b[:, None] * b_t) @ (lam_d[:r, None] * a_t[:r])  # (out, in)
    return h.f64(w) + delta_torch.T


def _parts(seed=0, n_out=5, rank=3):
    """Shared matrices sized for (in_max, out_max) = (8, 7); trainables for out = n_out."""
    rng = np.random.default_rng(seed)
    f = adapters.PVeRABasis(a=jnp.asarray(rng.standard_normal((8, 2 * rank)), jnp.float32),
                            b=jnp.asarray(rng.standard_normal((rank, 7)), jnp.float32))
    t = adapters.PVeRAParams(
        lambda_d=jnp.asarray(rng.uniform(-0.5, 0.5, 2 * rank), jnp.float32),
        lambda_b=jnp.asarray(rng.standard_normal(n_out), jnp.float32))
    return t, f


def test_init_shared_once_and_counts(getkey):
    params = {"q": jnp.ones((6, 10)), "k": jnp.ones((12, 5))}
    ad = adapters.pvera(3, max_in=12, max_out=10, projection_seed=2)
    a = tree.assign(params, [tree.Rule(where="q|k", then=ad)])
    state = adapters.init(a, getkey(), params)
    t = state.trainable["q"]
    np.testing.assert_array_equal(np.asarray(t.lambda_d), np.full(6, 0.1, np.float32))
    np.testing.assert_array_equal(np.asarray(t.lambda_b), np.zeros(10, np.float32))
    h.assert_tree_allclose(adapters.materialize(a, params, *state), params, **h.EXACT)
    shared = state.frozen[adapters.SHARED]
    want = adapters.pvera_shared(3, 12, 10, projection_seed=2)
    assert shared["pvera_A"].shape == (12, 6) and shared["pvera_B"].shape == (3, 10)
    np.testing.assert_array_equal(np.asarray(shared["pvera_A"]), np.asarray(want.a))
    np.testing.assert_array_equal(np.asarray(shared["pvera_B"]), np.asarray(want.b))
    # PEFT's kaiming-uniform bounds: √(6/in_max) for A, √(6/r) for B.
    assert float(jnp.abs(want.a).max()) <= np.sqrt(6 / 12)
    assert float(jnp.abs(want.b).max()) <= np.sqrt(6 / 3)
    assert float(jnp.abs(want.b).max()) > np.sqrt(6 / 12)
    # PEFT counted 2r + out: 16 for Linear(6, 10) and 11 for Linear(12, 5) at r=3.
    assert ad.num_trainable(params["q"]) == 16
    assert ad.num_trainable(params["k"]) == 11
    assert adapters.num_trainable(state.trainable) == 27


def test_mean_form_weight_space_and_factored_match_float64():
    ad = adapters.pvera(3, max_in=8, max_out=8)
    t, f = _parts()
    w = jnp.asarray(np.random.default_rng(1).standard_normal((6, 5)), jnp.float32)
    want = ref_pvera(w, t, f)
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), want, **h.MATMUL_F32)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 6)), jnp.float32)
    terms = ad.factored.terms(w, t, f)
    np.testing.assert_allclose(h.f64(x @ w) + h.f64(terms.delta(x)), h.f64(x) @ want,
                               **h.MATMUL_F32)
    np.testing.assert_allclose(h.f64(adapters.pvera_delta(x, t, f)),
                               h.f64(x) @ (want - h.f64(w)), **h.MATMUL_F32)


def test_sampled_term_is_peft_reparametrisation():
    """PEFT's training forward: μ, ℓ = chunk(λ_d ⊙ (x Aᵀ)); λ_b ⊙ ((μ + ε·e^{ℓ/2}) Bᵀ)."""
    t, f = _parts(seed=3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 6)), jnp.float32)
    key = jax.random.key(7)
    got = h.f64(adapters.pvera_delta(x, t, f, key=key))
    hdn = (h.f64(x) @ h.f64(f.a)[:6]) * h.f64(t.lambda_d)  # sliced to in = 6
    mu, logvar = hdn[..., :3], hdn[..., 3:]
    eps = h.f64(jax.random.normal(key, (2, 4, 3), jnp.float32))
    want = ((mu + eps * np.exp(0.5 * logvar)) @ h.f64(f.b)[:, :5]) * h.f64(t.lambda_b)
    np.testing.assert_allclose(got, want, **h.MATMUL_F32)
    mean = h.f64(adapters.pvera_delta(x, t, f))
    assert np.abs(got - mean).max() > 1e-3  # the noise is there
    # The log-variance half acts only when sampling.
    g = jax.grad(lambda tt: jnp.sum(adapters.pvera_delta(x, tt, f, key=key)))(t)
    g0 = jax.grad(lambda tt: jnp.sum(adapters.pvera_delta(x, tt, f)))(t)
    assert float(jnp.abs(g.lambda_d[3:]).max()) > 0
    np.testing.assert_array_equal(np.asarray(g0.lambda_d[3:]), 0.0)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"pvera: matrix \(in=6, out=9\), dtype float32"):
        adapters.pvera(2, max_in=8, max_out=8).init(jax.random.key(0), jnp.ones((6, 9)))
    with pytest.raises(ValueError, match="max_in must be a positive int"):
        adapters.pvera(2, max_in=None, max_out=8)
    with pytest.raises(ValueError, match="d_initial must be finite"):
        adapters.pvera(2, max_in=8, max_out=8, d_initial=float("nan"))


def test_factored_path_with_shared_matrices_equals_materialize(getkey):
    """factored.transform on unrolled and stacked leaves reading the one shared pair."""
    from peftjax import factored

    rng = np.random.default_rng(5)
    params = {"up": jnp.asarray(rng.standard_normal((6, 9)) * 0.3, jnp.float32),
              "down": jnp.asarray(rng.standard_normal((2, 9, 9)) * 0.3, jnp.float32)}
    ad = adapters.pvera(4, max_in=9, max_out=9)
    a = tree.assign(params, [tree.Rule(where="up", then=ad),
                             tree.Rule(where="down", then=ad.with_dimension_numbers(
                                 tree.dims.stacked()))])
    state = adapters.init(a, getkey(), params)
    trainable = jax.tree.map(
        lambda v: jnp.asarray(rng.standard_normal(v.shape) * 0.1, v.dtype), state.trainable)
    x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)

    def model(p, x):
        hdn = jnp.tanh(x @ p["up"])
        hdn, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), hdn, p["down"])
        return hdn

    def loss_materialized(t):
        return jnp.sum(model(adapters.materialize(a, params, t, state.frozen), x))

    def loss_factored(t):
        return jnp.sum(factored.transform(model, a, t, state.frozen)(params, x))

    v1, g1 = jax.jit(jax.value_and_grad(loss_materialized))(trainable)
    v2, g2 = jax.jit(jax.value_and_grad(loss_factored))(trainable)
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-5)
    h.assert_tree_allclose(g2, g1, rtol=1e-4, atol=1e-5)  # summed over several matmuls
