"""Invariants of the initialisers (docs/methods.md#data-driven-initialisers), in NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, inits, train, tree
from tests.helpers import EXACT, GRAD_F32, MATMUL_F32, f64

IN, OUT, R = 10, 7, 2


def weights(seed=0, shape=(IN, OUT)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def trunc(m, r):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def run(ini, w, stats=None):
    p = {"w": w}
    plan = tree.assign(p, [tree.Rule(where="w", then=ini)])
    st = None if stats is None else {"w": stats}
    return plan, inits.run(plan, jax.random.key(0), p, stats=st)


def test_lora_sb_product_is_trunc_of_update_approximation():
    w, g = weights(0), weights(1)
    lr, warm, total = 1e-3, 0.1, 50
    for alpha in (None, 1.0, 16.0):
        ini = inits.lora_sb(R, learning_rate=lr, warmup_ratio=warm, total_steps=total, alpha=alpha)
        _, res = run(ini, w, g)
        t, f = res.state.trainable["w"], res.state.frozen["w"]
        s = adapters.scaling_value(ini.scaling, ini.alpha, R)
        dw = -lr / (warm * total) * np.sign(f64(g))
        got = s * f64(f.a) @ f64(t.core) @ f64(f.b)
        np.testing.assert_allclose(got, trunc(dw, R), **MATMUL_F32)
        np.testing.assert_allclose(f64(f.a).T @ f64(f.a), np.eye(R), **MATMUL_F32)
        np.testing.assert_allclose(f64(f.b) @ f64(f.b).T, np.eye(R), **MATMUL_F32)
        np.testing.assert_array_equal(f64(res.params["w"]), f64(w))  # base not adjusted
        merged = adapters.fold(res.assignment, res.params, *res.state)["w"]
        assert not np.allclose(f64(merged), f64(w))  # not output-preserving


def test_lora_sb_subspaces_independent_of_lr_and_core_proportional():
    w, g = weights(0), weights(1)
    _, r1 = run(inits.lora_sb(R, learning_rate=1e-3), w, g)
    _, r2 = run(inits.lora_sb(R, learning_rate=4e-3), w, g)
    f1, f2 = r1.state.frozen["w"], r2.state.frozen["w"]
    np.testing.assert_allclose(f64(f1.a) @ f64(f1.a).T, f64(f2.a) @ f64(f2.a).T, **MATMUL_F32)
    np.testing.assert_allclose(4 * f64(r1.state.trainable["w"].core),
                               f64(r2.state.trainable["w"].core), **MATMUL_F32)


def test_lora_sb_only_core_trains_and_chain_rule():
    w, g = weights(0), weights(1)
    _, res = run(inits.lora_sb(R, learning_rate=1e-2, alpha=4.0), w, g)
    x = weights(2, (5, IN))

    def loss(p, batch):
        return jnp.sum(jnp.tanh(batch @ p["w"]))

    opt = optax.adam(1e-2)
    t0 = res.state.trainable
    # One step from the initialiser's state (and its base), materialised.
    t = train.trainer(loss, opt, adapters=res.assignment, factored=False, donate=False)
    s, _ = t.step(t.init(jax.random.key(0), res.params, state=res.state), x, res.params)
    t1 = s.trainable
    assert set(jax.tree.leaves(jax.tree.map(lambda a: a.shape, t1))) <= {R}
    assert adapters.num_trainable(t0) == R * R
    # dL/dcore = s·aᵀ (dL/dW') bᵀ
    s = 4.0 / R
    f = res.state.frozen["w"]
    wp = adapters.materialize(res.assignment, res.params, *res.state)
    gw = jax.grad(lambda ww: loss({"w": ww}, x))(wp["w"])
    gc = jax.grad(lambda t: loss(adapters.materialize(res.assignment, res.params, t,
                                                      res.state.frozen), x))(t0)["w"].core
    np.testing.assert_allclose(f64(gc), s * f64(f.a).T @ f64(gw) @ f64(f.b).T, **GRAD_F32)


def test_lora_sb_trainable_count_ratio():
    # paper ranks: r=24 on RoBERTa-large (1024²), r=96 on 4096² (Llama-7B-sized)
    # and on GQA-style (4096, 1024) / (2048, 768) projections
    assert inits.lora_sb_num_trainable(24, [(1024, 1024)])["ratio"] == 85
    c = inits.lora_sb_num_trainable(96, [(4096, 4096), (4096, 1024)])
    assert c["lora_sb"] == 2 * 96 * 96 and c["lora"] == 96 * (8192 + 5120)
    for r, shape in ((24, (1024, 1024)), (96, (4096, 4096)), (96, (4096, 1024)),
                     (96, (2048, 768))):
        assert 27 <= inits.lora_sb_num_trainable(r, [shape])["ratio"] <= 90


@pytest.mark.parametrize("make", [
    lambda: inits.pissa(R, alpha=4.0),
    lambda: inits.pissa(R, alpha=4.0, scaling=adapters.Scaling.ALPHA_OVER_SQRT_RANK),
    lambda: inits.pissa(R, alpha=4.0, niter=6),
    lambda: inits.olora(R, alpha=4.0),
    lambda: inits.lora_ga(R, alpha=4.0),
    lambda: inits.lora_ga(R, alpha=4.0, variant="peft"),
    lambda: inits.corda(R, alpha=4.0),
    lambda: inits.corda(R, alpha=4.0, mode="kpm"),
])
def test_residual_plus_adapter_is_original(make):
    ini = make()
    w = weights(0)
    stats = {None: None, "gradient": weights(1),
             "covariance": jnp.asarray(np.cov(np.random.default_rng(3).standard_normal((IN, 40))),
                                       jnp.float32)}[ini.stats]
    _, res = run(ini, w, stats)
    merged = adapters.fold(res.assignment, res.params, *res.state)["w"]
    np.testing.assert_allclose(f64(merged), f64(w), **MATMUL_F32)


def test_pissa_is_trunc_and_norms():
    w = weights(0)
    _, res = run(inits.pissa(R, alpha=4.0), w)
    t = res.state.trainable["w"]
    s = 2.0
    np.testing.assert_allclose(s * f64(t.a) @ f64(t.b), trunc(f64(w), R), **MATMUL_F32)
    sv = np.linalg.svd(f64(w), compute_uv=False)[:R]
    np.testing.assert_allclose(np.linalg.norm(f64(t.a), axis=0), np.sqrt(sv / s), **MATMUL_F32)
    np.testing.assert_allclose(np.linalg.norm(f64(t.b), axis=1), np.sqrt(sv / s), **MATMUL_F32)


def test_olora_is_projection_on_qr_basis():
    w = weights(0)
    _, res = run(inits.olora(R, alpha=4.0), w)
    t = res.state.trainable["w"]
    wt = f64(w).T  # torch layout (out, in)
    q, _ = np.linalg.qr(wt)
    np.testing.assert_allclose(f64(t.b) @ f64(t.b).T, np.eye(R), **MATMUL_F32)
    np.testing.assert_allclose((f64(t.a) @ f64(t.b)).T, q[:, :R] @ q[:, :R].T @ wt, **MATMUL_F32)


def test_lora_ga_first_sgd_step_is_minus_trunc_2r_gradient():
    w, g = weights(0), weights(1)
    ini = inits.lora_ga(R, alpha=4.0, scale="gd", niter=None)
    _, res = run(ini, w, g)
    eta = 1e-4
    t = res.state.trainable["w"]
    # loss with gradient exactly g w.r.t. the effective weight: <g, W'>
    gr = jax.grad(lambda tt: jnp.sum(g * adapters.materialize(
        res.assignment, res.params, tt, res.state.frozen)["w"]))(res.state.trainable)["w"]
    s = 2.0
    a1, b1 = f64(t.a) - eta * f64(gr.a), f64(t.b) - eta * f64(gr.b)
    dw = s * (a1 @ b1 - f64(t.a) @ f64(t.b))
    want = -eta * trunc(f64(g), 2 * R)
    rel = np.linalg.norm(dw - want) / np.linalg.norm(want)
    assert rel < 1e-3, rel  # first order in eta (docs/methods.md#lora-ga: 5e-4 at 1e-4)


def test_lora_ga_stable_scale_orthogonality():
    w, g = weights(0), weights(1)
    _, res = run(inits.lora_ga(R, scale="stable", stable_gamma=16.0, niter=None), w, g)
    t = res.state.trainable["w"]
    c2 = (OUT ** 0.25 / 4.0) ** 2
    np.testing.assert_allclose(f64(t.a).T @ f64(t.a), c2 * np.eye(R), **MATMUL_F32)
    np.testing.assert_allclose(f64(t.b) @ f64(t.b).T, c2 * np.eye(R), **MATMUL_F32)


def test_corda_decomposition_and_modes():
    from peftjax.inits import _corda
    w = weights(0)
    c = np.cov(np.random.default_rng(3).standard_normal((IN, 40)))
    u, sv, v = _corda._decompose(jnp.asarray(w).T, jnp.asarray(c, jnp.float32))
    np.testing.assert_allclose((f64(u) * f64(sv)) @ f64(v).T, f64(w).T, rtol=0, atol=1e-5)
    for mode, sl in (("ipm", slice(0, R)), ("kpm", slice(OUT - R, OUT))):
        _, res = run(inits.corda(R, alpha=2.0, mode=mode), w, jnp.asarray(c, jnp.float32))
        t = res.state.trainable["w"]
        want = (f64(u)[:, sl] * f64(sv)[sl]) @ f64(v)[:, sl].T
        np.testing.assert_allclose((f64(t.a) @ f64(t.b)).T, want, rtol=0, atol=1e-5)


def test_corda_damping_terminates_on_singular_covariance():
    w = weights(0)
    c = jnp.zeros((IN, IN), jnp.float32).at[0, 0].set(1.0)  # rank 1
    _, res = run(inits.corda(R), w, c)
    assert np.isfinite(f64(res.state.trainable["w"].a)).all()


def test_stacked_leaf_is_per_layer():
    w = weights(0, (3, IN, OUT))
    _, res = run(inits.pissa(R, dimension_numbers=tree.dims.stacked()), w)
    for i in range(3):
        _, one = run(inits.pissa(R), w[i])
        np.testing.assert_allclose(f64(res.params["w"][i]), f64(one.params["w"]), **MATMUL_F32)
    np.testing.assert_array_equal(res.state.trainable["w"].a.shape, (3, IN, R))
    assert EXACT["rtol"] == 0
