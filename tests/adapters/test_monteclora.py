"""MonteCLoRA (peftjax.adapters.monteclora): LoRA at evaluation (the contract suite's
reference); the training draw's distribution against PEFT's sampler equations in
float64 (noise, Wishart diagonal, log-normal Dirichlet weights); PEFT's variational
loss in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from peftjax import adapters, tree
from tests import helpers as h


def _state(seed=0, n_in=6, r=3, n=4, scaler=0.05, dtype=jnp.float64, **kw):
    """A one-leaf assignment and a state with random priors (no adapters.init)."""
    params = {"w": jnp.zeros((n_in, 5), dtype)}
    ad = adapters.monteclora(r, num_samples=n, sample_scaler=scaler, param_dtype=dtype,
                             **kw)
    a = tree.assign(params, [tree.Rule(where="w", then=ad)])
    rng = np.random.default_rng(seed)
    t = adapters.MonteCLoRAParams(
        a=jnp.asarray(rng.standard_normal((n_in, r)), dtype),
        b=jnp.zeros((r, 5), dtype),
        std_prior=jnp.asarray(rng.uniform(0.2, 0.8, r), dtype),
        expert_weights_prior=jnp.asarray(rng.uniform(-0.5, 0.5, n), dtype))
    f = adapters.MonteCLoRABuffers(jnp.eye(r, dtype=dtype), jnp.full((n,), 1 / n, dtype))
    return a, adapters.AdapterState({"w": t}, {"w": f})


def test_monteclora_training_draw_matches_peft_sampler_equations():
    k_draws = 3000  # deterministic keys; tolerances are >= 3 Monte Carlo sigmas
    # float32 draws (a model's dtype; no float64 recompiles), statistics in float64
    a, st = _state(dtype=jnp.float32)
    t = st.trainable["w"]

    def draws_and_grads(keys, tr):  # one compile for both
        ts, fs = jax.vmap(lambda k: adapters.monteclora_sample(k, a, tr, st.frozen))(keys)
        # reparameterised: the draw is differentiable in the priors (PEFT's gradients)
        grads = jax.grad(lambda x: jnp.sum(adapters.monteclora_sample(
            keys[0], a, x, st.frozen)[0]["w"].a ** 2))(tr)
        return ts, fs, grads

    ts, fs, grads = jax.jit(draws_and_grads)(
        jax.random.split(jax.random.key(3), k_draws), st.trainable)
    a_s, g = h.f64(ts["w"].a), np.diagonal(h.f64(fs["w"].gaussian_var), axis1=1, axis2=2)
    w = h.f64(fs["w"].expert_weights)
    assert np.all(np.abs(h.f64(grads["w"].std_prior)) > 0)
    assert np.all(np.abs(h.f64(grads["w"].expert_weights_prior)) > 0)
    gaps = [np.abs(a_s[i] - a_s[j]).max() for i in range(5) for j in range(i)]
    assert min(gaps) > 1e-3  # one draw per key: no two keys give the same A
    mean_a, sigma, pi = h.f64(t.a), h.f64(t.std_prior), h.f64(t.expert_weights_prior)
    r, n = 3, 4
    # Wishart(df=r, I) diagonal: g_p / e^{2σ_p} ~ χ²(r) (mean r, variance 2r)
    c = g / np.exp(2 * sigma)
    np.testing.assert_allclose(c.mean(0), r, rtol=0.06)
    np.testing.assert_allclose(c.var(0), 2 * r, rtol=0.2)
    # A' - a = Σ w_n E_n: N(0, scaler²·g_p·Σw²) given the draw's g and w
    z = (a_s - mean_a) / (0.05 * np.sqrt(g[:, None, :] * (w**2).sum(1)[:, None, None]))
    assert abs(z.mean()) < 0.02 and abs(z.var() - 1) < 0.03
    # weights: log w = logits + const, logits ~ N(μ, d + 1e-6) (normal Dirichlet approx.)
    alpha = np.exp(pi)
    mu = np.log(alpha) - np.log(alpha).mean()
    d = (1 / alpha) * (1 - 2 / n) + (1 / alpha).sum() / n**2 + 1e-6
    lw = np.log(w)
    diff = lw[:, 1:] - lw[:, :1]
    np.testing.assert_allclose(diff.mean(0), mu[1:] - mu[0], atol=0.1)
    np.testing.assert_allclose(diff.var(0), d[1:] + d[0], rtol=0.1)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize("use_entropy", [False, True])
def test_monteclora_loss_is_peft_variational_loss_in_float64(use_entropy):
    with jax.enable_x64(True):
        a, st = _state(use_entropy=use_entropy, dirichlet_prior=0.3, kl_loss_weight=0.01)
        f, got = jax.jit(lambda t, fr: (
            lambda fs: (fs, adapters.monteclora_loss(a, t, fs)))(
                adapters.monteclora_sample(jax.random.key(5), a, t, fr)[1]))(*st)
        got = float(got)
    t = st.trainable["w"]
    a2, a1 = np.exp(h.f64(t.expert_weights_prior)), np.full(4, 0.3)
    kl1 = (np.log(special.gamma(a2.sum()) / special.gamma(a1.sum()))
           + np.log(special.gamma(a2) / special.gamma(a1)).sum()
           + ((a2 - a1) * (special.digamma(a2) - special.digamma(a2.sum()))).sum())
    var = np.exp(2 * h.f64(t.std_prior))
    kl2 = 0.5 * (-np.log(var).sum() * 3 + var.sum() * 3 - 9)
    gv = np.maximum(np.diag(h.f64(f["w"].gaussian_var)), 1e-6)
    kl3 = 4 * 0.5 * (gv.sum() - np.log(gv).sum() - 3)
    want = 0.01 * (kl1 + kl2 + kl3) + ((h.f64(f["w"].expert_weights) ** 2).sum()
                                       if use_entropy else 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
