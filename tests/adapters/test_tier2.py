"""Tier-2 adapters: SVFit, NOLA, ABBA and SoRA (+ its proximal step and pruning).

The contract suite (test_contract.py) covers the shared behaviour; this file
checks each method's defining property against float64 NumPy references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, factored, optim, tree
from tests import helpers as h

# float64 round-off of a few short sums of products (the Khatri-Rao identity).
F64_ROUNDOFF = dict(rtol=1e-12, atol=1e-12)


def _w(shape, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * 0.5, dtype)


def _svd64(m):
    return np.linalg.svd(h.f64(m), full_matrices=False)


def _projector(cols):
    return cols @ cols.T


# ---------------------------------------------------------------------------
# SVFit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flax", "torch"])
def test_svfit_changes_only_the_top_singular_values(layout, getkey):
    r = 3
    if layout == "flax":
        w, dn = _w((7, 5)), None
    else:  # Equinox / torch (out, in): the matrix view is the transpose
        w, dn = _w((5, 7)), tree.DimensionNumbers(reduction_axis=1, output_axis=0)
    ad = adapters.svfit(rank=r, dimension_numbers=dn)
    t, f = ad.init(getkey(), w)
    u0, s0, vt0 = _svd64(w)
    np.testing.assert_allclose(h.f64(f.singular_values), s0[:r], **h.MATMUL_F32)
    # Offsets that keep the singular values in the same order.
    delta = np.array([0.4, 0.3, 0.2])
    t = t._replace(delta_s=jnp.asarray(delta, jnp.float32))
    w2 = ad.apply(w, t, f)
    u1, s1, vt1 = _svd64(w2)
    np.testing.assert_allclose(s1[:r], s0[:r] + delta, **h.MATMUL_F32)
    np.testing.assert_allclose(s1[r:], s0[r:], **h.MATMUL_F32)
    # The singular subspaces are unchanged (projectors, so signs do not matter).
    np.testing.assert_allclose(_projector(u1[:, :r]), _projector(u0[:, :r]),
                               **h.MATMUL_F32)
    np.testing.assert_allclose(_projector(vt1[:r].T), _projector(vt0[:r].T),
                               **h.MATMUL_F32)
    np.testing.assert_allclose(_projector(u1[:, r:]), _projector(u0[:, r:]),
                               **h.MATMUL_F32)


def test_svfit_stacked_layers_use_their_own_svd(getkey):
    w = _w((3, 6, 5))
    ad = adapters.svfit(rank=2, dimension_numbers=tree.dims.stacked())
    t, f = ad.init(getkey(), w)
    assert t.delta_s.shape == (3, 2) and f.u.shape == (3, 6, 2)
    t = t._replace(delta_s=jnp.asarray([[0.5, 0.1], [0.2, 0.3], [0.4, 0.4]],
                                       jnp.float32))
    w2 = ad.apply(w, t, f)
    for i in range(3):
        s0 = _svd64(w[i])[1]
        s1 = _svd64(w2[i])[1]
        np.testing.assert_allclose(s1[:2], s0[:2] + h.f64(t.delta_s[i]), **h.MATMUL_F32)
        np.testing.assert_allclose(s1[2:], s0[2:], **h.MATMUL_F32)


# ---------------------------------------------------------------------------
# NOLA
# ---------------------------------------------------------------------------


def test_nola_materialize_equals_numpy_combination_of_regenerated_bases(getkey):
    ka, kb, r, seed = 5, 4, 2, 3
    params = {"w": _w((6, 5)), "stack": _w((2, 6, 5), seed=1)}
    ad = adapters.nola(r, ka, kb, alpha=4.0, basis_seed=seed)
    a = tree.assign(params, [tree.Rule(where="w|stack", then=ad)],
                    layout=tree.stacked("stack"))
    state = adapters.init(a, getkey(), params)
    # Identity at init: beta = 0, alpha random.
    np.testing.assert_array_equal(np.asarray(state.trainable["w"].coef_b), np.zeros(kb))
    assert np.any(np.asarray(state.trainable["w"].coef_a) != 0)
    rng = np.random.default_rng(5)
    trainable = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), state.trainable)
    out = adapters.materialize(a, params, trainable, state.frozen)
    # The bases regenerated from the seed alone are the stored frozen ones.
    bs = adapters.nola_basis(r, 6, 5, ka, kb, basis_seed=seed)
    h.assert_tree_allclose(state.frozen["w"], bs, **h.EXACT)
    s = 4.0 / r
    want = h.f64(params["w"]) + s * (
        np.einsum("k,kir->ir", h.f64(trainable["w"].coef_a), h.f64(bs.a))
        @ np.einsum("k,kro->ro", h.f64(trainable["w"].coef_b), h.f64(bs.b)))
    np.testing.assert_allclose(h.f64(out["w"]), want, **h.MATMUL_F32)
    for i in range(2):  # every stacked layer shares the bases, not the coefficients
        ti = jax.tree.map(lambda x, i=i: x[i], trainable["stack"])
        want_i = h.f64(params["stack"][i]) + s * (
            np.einsum("k,kir->ir", h.f64(ti.coef_a), h.f64(bs.a))
            @ np.einsum("k,kro->ro", h.f64(ti.coef_b), h.f64(bs.b)))
        np.testing.assert_allclose(h.f64(out["stack"][i]), want_i, **h.MATMUL_F32)
    # Trainable count: k_a + k_b per matrix, whatever its size.
    assert adapters.num_trainable(trainable) == (ka + kb) * (1 + 2)
    assert ad.num_trainable(jnp.zeros((64, 48))) == ka + kb


def test_nola_basis_depends_on_the_seed_and_has_the_documented_scale():
    b0 = adapters.nola_basis(4, 32, 24, 64, 32, basis_seed=0)
    b1 = adapters.nola_basis(4, 32, 24, 64, 32, basis_seed=1)
    assert not np.allclose(h.f64(b0.a), h.f64(b1.a))
    # U(-1, 1)/sqrt(k): bounded by 1/sqrt(k), variance 1/(3k).
    for x, k in ((b0.a, 64), (b0.b, 32)):
        x = h.f64(x)
        assert np.abs(x).max() <= 1 / np.sqrt(k)
        # Sample variance of >= 3072 draws: ~2% standard error, so 10% is loose.
        np.testing.assert_allclose(x.var() * 3 * k, 1.0, rtol=0.1)


def test_nola_gradient_at_init_reaches_beta(getkey):
    ad = adapters.nola(2, 5, 4)
    w = _w((6, 5))
    t, f = ad.init(getkey(), w)
    c = _w((6, 5), seed=2)
    g = jax.grad(lambda tt: jnp.sum(ad.apply(w, tt, f) * c))(t)
    # dL/dbeta_j = s·<A^T c, B_j> with A = sum alpha_i A_i; dL/dalpha = 0 (B = 0).
    a = np.einsum("k,kir->ir", h.f64(t.coef_a), h.f64(f.a))
    want = 4.0 * np.einsum("ro,kro->k", a.T @ h.f64(c), h.f64(f.b))
    np.testing.assert_allclose(h.f64(g.coef_b), want, **h.MATMUL_F32)
    np.testing.assert_array_equal(np.asarray(g.coef_a), np.zeros(5, np.float32))


# ---------------------------------------------------------------------------
# ABBA
# ---------------------------------------------------------------------------


def test_abba_khatri_rao_identity_in_float64():
    rng = np.random.default_rng(0)
    a1, b1 = rng.standard_normal((7, 3)), rng.standard_normal((3, 5))
    a2, b2 = rng.standard_normal((7, 2)), rng.standard_normal((2, 5))
    with jax.enable_x64(True):
        a_kr, b_kr = adapters.abba_khatri_rao(*(jnp.asarray(m) for m in (a1, b1, a2, b2)))
        assert a_kr.dtype == jnp.float64 and a_kr.shape == (7, 6) and b_kr.shape == (6, 5)
        got = np.asarray(a_kr) @ np.asarray(b_kr)
    np.testing.assert_allclose(got, (a1 @ b1) * (a2 @ b2), **F64_ROUNDOFF)
    # Entry layout: a_kr[i, p·r2+q] = a1[i,p]·a2[i,q], b_kr[p·r2+q, j] = b1[p,j]·b2[q,j].
    np.testing.assert_allclose(np.asarray(a_kr)[4, 1 * 2 + 0], a1[4, 1] * a2[4, 0],
                               **F64_ROUNDOFF)
    np.testing.assert_allclose(np.asarray(b_kr)[2 * 2 + 1, 3], b1[2, 3] * b2[1, 3],
                               **F64_ROUNDOFF)


def test_abba_init_first_pair_is_the_truncated_svd(getkey):
    w = _w((7, 5))
    t, _ = adapters.abba(2, 3).init(getkey(), w)
    u, s, vt = _svd64(w)
    np.testing.assert_allclose(h.f64(t.a1) @ h.f64(t.b1),
                               (u[:, :2] * s[:2]) @ vt[:2], **h.MATMUL_F32)
    np.testing.assert_array_equal(np.asarray(t.b2), np.zeros((3, 5), np.float32))
    bound = np.sqrt(6.0 / 7)
    assert np.abs(h.f64(t.a2)).max() <= bound and np.any(h.f64(t.a2) != 0)


# ---------------------------------------------------------------------------
# Factored path (peftjax.factored) equals materialize, for every Tier-2 adapter
# ---------------------------------------------------------------------------

FACTORED = {
    "svfit": lambda: adapters.svfit(2),
    "nola": lambda: adapters.nola(2, 5, 4, alpha=4.0),
    "abba": lambda: adapters.abba(2, 3, alpha=2.0),
    "loha": lambda: adapters.loha(3, alpha=6.0),
    "sora": lambda: adapters.sora(3, alpha=6.0),
}


def _moved(trainable, seed=7):
    """Moves every trainable leaf away from its init, so that every term counts."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + jnp.asarray(rng.standard_normal(x.shape) * 0.3, x.dtype), trainable)


def _dense(p, x):
    return x @ p["w"]


def _scanned(p, x):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["w"])[0]


@pytest.mark.parametrize("model", ["dense", "scan"])
@pytest.mark.parametrize("name", sorted(FACTORED))
def test_factored_outputs_and_grads_equal_materialize(name, model, getkey):
    fn, shape = (_dense, (7, 5)) if model == "dense" else (_scanned, (2, 6, 6))
    params = {"w": _w(shape)}
    x = _w((3, shape[-2]), seed=9)
    a = tree.assign(params, [tree.Rule(where="w", then=FACTORED[name]())],
                    layout=tree.stacked("w") if model == "scan" else None)
    state = adapters.init(a, getkey(), params)
    trainable, frozen = _moved(state.trainable), state.frozen

    def ref(t):
        y = fn(adapters.materialize(a, params, t, frozen), x)
        return jnp.sum(jnp.square(y)), y

    def fac(t):
        y = factored.transform(fn, a, t, frozen)(params, x)
        return jnp.sum(jnp.square(y)), y

    (g_ref, y_ref), (g, y) = jax.jit(
        lambda t: (jax.grad(ref, has_aux=True)(t), jax.grad(fac, has_aux=True)(t)))(trainable)
    scale = float(jnp.max(jnp.abs(y_ref)))  # sums that partly cancel: relative to scale
    h.assert_tree_allclose(y, y_ref, rtol=h.MATMUL_F32["rtol"],
                           atol=h.MATMUL_F32["rtol"] * scale)
    h.assert_tree_allclose(g, g_ref, **h.GRAD_F32)


def _all_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_shapes(inner)


@pytest.mark.parametrize("name", sorted(FACTORED))
def test_factored_step_forms_no_weight_sized_array(name, getkey):
    params = {"w": _w((7, 5))}
    x = _w((3, 7), seed=9)
    a = tree.assign(params, [tree.Rule(where="w", then=FACTORED[name]())])
    state = adapters.init(a, getkey(), params)

    def loss(t, p):
        return jnp.sum(jnp.square(factored.transform(_dense, a, t, state.frozen)(p, x)))

    jaxpr = jax.make_jaxpr(jax.grad(loss))(state.trainable, params).jaxpr
    shapes = set(_all_shapes(jaxpr))
    assert (7, 5) not in shapes and (5, 7) not in shapes, sorted(shapes)

    def dense_loss(t, p):  # control: the weight-space path does form W'
        return jnp.sum(jnp.square(_dense(adapters.materialize(a, p, t, state.frozen), x)))

    control = jax.make_jaxpr(jax.grad(dense_loss))(state.trainable, params).jaxpr
    assert (7, 5) in set(_all_shapes(control))


# ---------------------------------------------------------------------------
# SoRA: the proximal step and pruning
# ---------------------------------------------------------------------------


def _sora_tree():
    return {"q/kernel": adapters.SoRAParams(
        a=_w((4, 8), seed=1), b=_w((8, 3), seed=2),
        gate=jnp.asarray([0.5, -0.5, 0.1, -0.05, 1.0, -2.0, 0.3, 0.0], jnp.float32))}


def test_scale_by_sora_soft_thresholds_only_the_gates():
    params = _sora_tree()
    rng = np.random.default_rng(4)
    upd = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.2,
                                             jnp.float32), params)
    # Two gates land exactly on |z| = tau = 0.25 (must be zeroed, '<=').
    upd["q/kernel"] = upd["q/kernel"]._replace(gate=upd["q/kernel"].gate.at[:2].set(
        jnp.asarray([-0.25, 0.25], jnp.float32)))
    lr, lam = 0.5, 0.5
    tx = optim.scale_by_sora(lr, lam)
    out, state = jax.jit(tx.update)(upd, tx.init(params), params)
    assert int(state.count) == 1
    new = optax.apply_updates(params, out)
    g, u = h.f64(params["q/kernel"].gate), h.f64(upd["q/kernel"].gate)
    z, tau = g + u, lr * lam
    zero = np.abs(z) <= tau
    assert zero[:2].all() and zero.any() and not zero.all()
    got = h.f64(new["q/kernel"].gate)
    np.testing.assert_array_equal(got[zero], 0.0)
    # p + (shrunk - p) rounds at the scale of p: an absolute float32 ulp.
    np.testing.assert_allclose(got[~zero], np.sign(z[~zero]) * (np.abs(z[~zero]) - tau),
                               **h.MATMUL_F32)
    for field in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(getattr(out["q/kernel"], field)),
                                      np.asarray(getattr(upd["q/kernel"], field)))


def test_scale_by_sora_schedule_inject_hyperparams_and_errors():
    params = _sora_tree()
    upd = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
    schedule = lambda count: 0.1 * (count + 1).astype(jnp.float32)  # noqa: E731
    tx = optim.scale_by_sora(schedule, 2.0)
    s = tx.init(params)
    _, s = tx.update(upd, s, params)
    out, _ = tx.update(upd, s, params)  # step 2: tau = 0.2·2
    z = h.f64(params["q/kernel"].gate) + 0.1
    want = np.sign(z) * np.maximum(np.abs(z) - 0.4, 0.0) - h.f64(params["q/kernel"].gate)
    np.testing.assert_allclose(h.f64(out["q/kernel"].gate), want, **h.ELEMENTWISE_F32)
    with jax.numpy_dtype_promotion("standard"):  # optax's injected hyperparameters
        inj = optax.inject_hyperparams(optim.scale_by_sora, static_args=("gate_name",))(
            learning_rate=0.3, lambda_=0.5)
        a, _ = inj.update(upd, inj.init(params), params)
    b, _ = optim.scale_by_sora(0.3, 0.5).update(upd, tx.init(params), params)
    h.assert_tree_allclose(a, b, **h.ELEMENTWISE_F32)
    with pytest.raises(ValueError, match="no leaf path ends in '/gate'"):
        optim.scale_by_sora(0.1, 1.0).init({"q/kernel": {"a": jnp.ones(3)}})
    with pytest.raises(ValueError, match="needs params"):
        tx.update(upd, s)


def test_sora_prune_gives_a_smaller_lora_with_the_same_weights(getkey):
    params = {"lin": _w((6, 5)), "stack": _w((3, 6, 5), seed=1), "off": _w((6, 5), seed=2),
              "other": _w((5, 4), seed=3)}
    a = tree.assign(params, [
        tree.Rule(where="lin|stack|off", then=adapters.sora(4, alpha=8.0)),
        tree.Rule(where="other", then=adapters.lora(2))], layout=tree.stacked("stack"))
    state = adapters.init(a, getkey(), params)
    trainable = _moved(state.trainable)
    gates = {"lin": [0.7, 0.0, -1.2, 0.0],
             "stack": [[0.0, 0.4, 0.0, 0.0], [0.9, 0.0, 0.2, -0.3], [0.0, 0.0, 0.0, 0.0]],
             "off": [0.0, 0.0, 0.0, 0.0]}
    for p, g in gates.items():
        trainable[p] = trainable[p]._replace(gate=jnp.asarray(g, jnp.float32))
    before = adapters.materialize(a, params, trainable, state.frozen)

    a2, s2 = adapters.sora_prune(a, trainable, state.frozen)
    assert set(a2) == {"lin", "stack", "other"}  # all-zero gates: path dropped
    assert s2.trainable["lin"].a.shape == (6, 2) and s2.trainable["lin"].b.shape == (2, 5)
    # Stacked: one rank for every layer, the largest surviving count (3).
    assert s2.trainable["stack"].a.shape == (3, 6, 3)
    assert isinstance(s2.trainable["lin"], adapters.LoRAParams)
    assert s2.trainable["other"] is trainable["other"] and a2["other"] is a["other"]
    after = adapters.materialize(a2, params, *s2)
    h.assert_tree_allclose(after, before, **h.MATMUL_F32)
    np.testing.assert_array_equal(np.asarray(after["off"]), np.asarray(params["off"]))
    # Float64 reference of the kept ranks: s·a[:, k]·g[k] @ b[k].
    t = trainable["lin"]
    k = [0, 2]
    want = h.f64(params["lin"]) + 2.0 * (h.f64(t.a)[:, k] * h.f64(t.gate)[k]) @ h.f64(t.b)[k]
    np.testing.assert_allclose(h.f64(after["lin"]), want, **h.MATMUL_F32)
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda tr: adapters.sora_prune(a, tr, state.frozen)[1].trainable)(trainable)


def test_sora_train_with_prox_then_prune():
    """A rank-1 target: the proximal step zeroes the gates the fit does not need."""
    params = {"w": _w((6, 5))}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.sora(4, alpha=4.0))])
    state = adapters.init(a, jax.random.key(0), params)
    x = _w((16, 6), seed=3)
    y = x @ (params["w"] + 3.0 * _w((6, 1), seed=5) @ _w((1, 5), seed=6))
    lr = 0.2
    # Plain SGD: the gate steps follow the gradient size (Adam would equalise them).
    tx = optax.chain(optax.sgd(lr), optim.scale_by_sora(lr, 0.2))

    def loss(t):
        return jnp.mean((x @ adapters.materialize(a, params, t, state.frozen)["w"] - y) ** 2)

    @jax.jit
    def step(t, o):
        g = jax.grad(loss)(t)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int/float
            u, o = tx.update(g, o, t)
            return optax.apply_updates(t, u), o

    t, o = state.trainable, tx.init(state.trainable)
    for _ in range(40):
        t, o = step(t, o)
    gate = np.asarray(t["w"].gate)
    assert 0 < np.sum(gate != 0) < 4, gate
    assert float(loss(t)) < float(loss(state.trainable))
    a2, s2 = adapters.sora_prune(a, t, state.frozen)
    assert s2.trainable["w"].a.shape == (6, int(np.sum(gate != 0)))
    h.assert_tree_allclose(adapters.materialize(a2, params, *s2),
                           adapters.materialize(a, params, t, state.frozen), **h.MATMUL_F32)


# ---------------------------------------------------------------------------
# Errors name the argument and the shape
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda r: adapters.svfit(r),
    lambda r: adapters.nola(r, 4, 4),
    lambda r: adapters.abba(r, 2),
    lambda r: adapters.abba(2, r),
    lambda r: adapters.sora(r),
], ids=["svfit", "nola", "abba_rank1", "abba_rank2", "sora"])
def test_rank_errors(make):
    with pytest.raises(ValueError, match="rank must be > 0, got rank=0"):
        make(0)
    params = {"attn/q": jnp.ones((8, 6))}
    a = tree.assign(params, [tree.Rule(where="attn/q", then=make(7))])
    with pytest.raises(ValueError) as e:
        adapters.init(a, jax.random.key(0), params)
    msg = str(e.value)
    assert "'attn/q'" in msg and "(8, 6)" in msg and "rank=7" in msg


def test_nola_basis_count_errors():
    with pytest.raises(ValueError, match="num_basis_a must be > 0, got num_basis_a=0"):
        adapters.nola(2, 0, 4)
    with pytest.raises(ValueError, match="num_basis_b must be > 0"):
        adapters.nola(2, 4, -1)
    with pytest.raises(TypeError, match="num_basis_b must be a positive int"):
        adapters.nola(2, 4, 2.0)
