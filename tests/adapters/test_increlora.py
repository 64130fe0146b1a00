"""IncreLoRA (peftjax.adapters.increlora): the authors' code on a two-layer net (forward,
module scores, smoothing, growth, reserve zeroing), their orthogonality regulariser,
static shapes under growth, and which slots train."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).parent / "golden" / "increlora" / "increlora.npz"
R = 4  # pre-allocated slots in the golden test (l1 ends with 3 active + 1 reserve)


def ref_increlora(w, t, f, alpha=6.0):
    """float64 ``W0 + (a ⊙ ẽ) @ b · α/(rank + 1e-5)`` (active e, reserve value, 0)."""
    e = h.f64(t.e)
    j = np.arange(e.shape[-1])
    rank, res, rv = int(f.rank), int(f.reserve), float(f.reserve_value)
    e_eff = np.where(j < rank, e, np.where(j < rank + res, rv, 0.0))
    return h.f64(w) + (h.f64(t.a) * e_eff[None, :]) @ h.f64(t.b) * alpha / (rank + 1e-5)


def _pad(a, axis, n=R):
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, n - a.shape[axis])
    return np.pad(a, pad)


def _net(p, x):
    hdn = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"][None, :])
    return hdn @ p["l2"]["kernel"] + p["l2"]["bias"][None, :]


def test_increlora_matches_the_authors_code():
    g = dict(np.load(GOLDEN))
    names = ("l1", "l2")
    with jax.enable_x64(True):
        params = {n: {"kernel": jnp.asarray(g[f"{n}/weight"].T),
                      "bias": jnp.asarray(g[f"{n}/bias"])} for n in names}
        ad = adapters.increlora(R, alpha=4.0, param_dtype=jnp.float64)
        assign = tree.assign(params, [tree.Rule(where="l1/kernel|l2/kernel", then=ad)])
        one = {f"{n}/kernel": adapters.IncreLoRARank(
            jnp.asarray(1, jnp.int32), jnp.asarray(1, jnp.int32),
            jnp.asarray(1e-5, jnp.float32)) for n in names}  # what init gives (init_rank 1)
        state = adapters.AdapterState({}, one)

        def mse(m, x, target):
            return jnp.mean((_net(m, x) - target) ** 2)

        @jax.jit
        def forward_and_scores(state, x, target):
            merged = adapters.materialize(assign, params, *state)
            loss, grads, scores = adapters.increlora_value_and_grad(
                mse, assign, params, state, x, target)
            # the same as scoring a separate gradient, and as differentiating the factors
            scores2 = adapters.increlora_module_scores(
                assign, params, state, jax.grad(mse)(merged, x, target))
            grads2 = jax.grad(lambda t: mse(adapters.materialize(assign, params, t,
                                                                 state.frozen), x, target))(
                state.trainable)
            return _net(merged, x), loss, scores, (scores2, grads, grads2)

        @jax.jit
        def smooth_and_grow(imp, state, scores):
            imp = adapters.increlora_update_importance(imp, scores)
            return imp, adapters.increlora_grow(state, imp, top_h=1, target_total_rank=4)[0]

        imp = adapters.increlora_init_importance(state.frozen)
        zero = {f"{n}/kernel": jnp.zeros(()) for n in names}
        imp = adapters.increlora_update_importance(imp, zero)  # the authors' step 0
        for step in (1, 2):
            # components from the authors' model (their new reserve is drawn at
            # growth); ranks, E and the reserve value carried over from ours
            trainable, frozen = {}, dict(state.frozen)
            for n in names:
                p = f"{n}/kernel"
                a, e, b = (g[f"s{step}/{n}/{k}"] for k in "AEB")
                assert int(frozen[p].rank) == int(g[f"s{step}/{n}/rank_before"])
                if step > 1:  # our E after growth (the reserve's E is no parameter)
                    live = np.arange(e.size) < int(frozen[p].rank)
                    np.testing.assert_allclose(
                        np.asarray(state.trainable[p].e)[:e.size][live], e[live], rtol=1e-7)
                trainable[p] = adapters.IncreLoRAParams(
                    a=jnp.asarray(_pad(a.T, 1)), e=jnp.asarray(_pad(e, 0)),
                    b=jnp.asarray(_pad(b.T, 0)))
            state = adapters.AdapterState(trainable, frozen)
            target = jnp.asarray(g[f"s{step}/target"])
            y, loss, scores, (scores2, grads, grads2) = forward_and_scores(
                state, jnp.asarray(g[f"s{step}/x"]), target)
            want_loss = np.mean((g[f"s{step}/y"] - g[f"s{step}/target"]) ** 2)
            np.testing.assert_allclose(float(loss), want_loss, rtol=1e-10)
            h.assert_tree_allclose(scores2, scores, rtol=1e-6, atol=0)
            h.assert_tree_allclose(grads, grads2, rtol=1e-10, atol=1e-14)
            # the reserve value is a float32 1e-5 (2.5e-8 relative)
            np.testing.assert_allclose(np.asarray(y), g[f"s{step}/y"], rtol=1e-10, atol=1e-12)
            imp, state = smooth_and_grow(imp, state, scores)
            for n in names:
                p = f"{n}/kernel"
                for key, got in (("score", scores[p]), ("ipt", imp.ipt[p]),
                                 ("unc", imp.unc[p])):
                    np.testing.assert_allclose(float(got), g[f"s{step}/{n}/{key}"], rtol=1e-5)
                assert int(state.frozen[p].rank) == int(g[f"s{step}/{n}/rank_after"])
                e_after = g[f"s{step}/{n}/E_after"]
                rank = int(state.frozen[p].rank)
                np.testing.assert_allclose(np.asarray(state.trainable[p].e)[:rank],
                                           e_after[:rank], rtol=1e-7)  # float32 1e-5
                # the reserve's E: 1e-5, or 0 once the target is reached (step 2)
                np.testing.assert_allclose(float(state.frozen[p].reserve_value),
                                           e_after[rank], rtol=1e-7)


def test_increlora_orthogonality_is_the_authors_regulariser():
    g = dict(np.load(GOLDEN))
    t, f, want = {}, {}, []
    for n in ("l1", "l2"):
        a, e, b = (g[f"s2/{n}/{k}"] for k in "AEB")
        rank = int(g[f"s2/{n}/rank_before"])
        t[n] = adapters.IncreLoRAParams(jnp.asarray(_pad(a.T, 1), jnp.float32),
                                        jnp.asarray(_pad(e, 0), jnp.float32),
                                        jnp.asarray(_pad(b.T, 0), jnp.float32))
        f[n] = adapters.IncreLoRARank(jnp.asarray(rank, jnp.int32), jnp.asarray(1, jnp.int32),
                                      jnp.asarray(1e-5, jnp.float32))
        # their trainer: every existing A row and B column, AdaLoRA's Frobenius terms
        want += [np.linalg.norm(a @ a.T - np.eye(len(a))),
                 np.linalg.norm(b.T @ b - np.eye(b.shape[1]))]
    got = jax.jit(adapters.increlora_orthogonality)(adapters.AdapterState(t, f))
    np.testing.assert_allclose(float(got), 0.1 * np.mean(want), rtol=1e-5)


def test_increlora_slots_train_as_documented_and_growth_never_retraces():
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 5)),
                               jnp.float32)}
    ad = adapters.increlora(5, rank_step=2, alpha=4.0, dimension_numbers=tree.dims.stacked())
    assign = tree.assign(params, [tree.Rule(where="w", then=ad)])
    state = jax.jit(lambda k: adapters.init(assign, k, params))(jax.random.key(1))
    assert state.frozen["w"].rank.shape == (2,)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 6)), jnp.float32)
    calls = {"n": 0}

    @jax.jit
    def grad(state):
        calls["n"] += 1
        return jax.grad(lambda t: jnp.sum(jnp.tanh(
            x @ adapters.materialize(assign, params, t, state.frozen)["w"]) ** 2))(
                state.trainable)["w"]

    grow = jax.jit(adapters.increlora_grow, static_argnames="top_h")
    t = state.trainable["w"]
    state = state._replace(trainable={"w": t._replace(e=jnp.full_like(t.e, 0.5))})
    gw = grad(state)
    # slot 0 active, 1-2 reserve (advance learning: a, b trained, E fixed), 3-4 inert
    assert np.all(np.asarray(gw.e)[:, 0] != 0) and np.all(np.asarray(gw.e)[:, 1:] == 0)
    assert np.all(np.asarray(gw.a)[:, :, 1:3] != 0)
    assert np.all(np.asarray(gw.a)[:, :, 3:] == 0) and np.all(np.asarray(gw.b)[:, 3:] == 0)
    # grow layer 1 only: its reserve (slots 1-2) becomes active, from the reserve value
    scores = {"w": jnp.asarray([0.1, 0.9])}
    state2, grown = grow(state, scores, top_h=1, target_total_rank=10)
    np.testing.assert_array_equal(np.asarray(grown["w"]), [False, True])
    np.testing.assert_array_equal(np.asarray(state2.frozen["w"].rank), [1, 3])
    np.testing.assert_allclose(np.asarray(state2.trainable["w"].e)[1, 1:3], 1e-5)
    gw2 = grad(state2)
    assert calls["n"] == 1  # growth changes values, never shapes
    assert np.all(np.asarray(gw2.e)[1, :3] != 0) and np.all(np.asarray(gw2.e)[1, 3:] == 0)
    # no room for another reserve in layer 1 (3 + 2 + 2 > 5): layer 0 grows instead
    state3, _ = grow(state2, scores, top_h=1, target_total_rank=10)
    np.testing.assert_array_equal(np.asarray(state3.frozen["w"].rank), [3, 3])
    # reaching the target zeroes the reserve value
    state4, _ = grow(state2, scores, top_h=1, target_total_rank=6)
    assert float(np.max(state4.frozen["w"].reserve_value)) == 0.0


def test_increlora_bad_arguments():
    with pytest.raises(ValueError, match="max_rank=2 must be >= init_rank \\+ rank_step"):
        adapters.increlora(2, init_rank=2)
    t = adapters.IncreLoRAParams(jnp.ones((3, 2)), jnp.ones(2), jnp.ones((2, 3)))
    f = adapters.IncreLoRARank(jnp.asarray(1), jnp.asarray(1), jnp.asarray(1e-5))
    s = adapters.AdapterState({"w": t}, {"w": f})
    with pytest.raises(ValueError, match="increlora_grow: scores cover"):
        adapters.increlora_grow(s, {"v": jnp.zeros(())}, top_h=1, target_total_rank=3)
    with pytest.raises(ValueError, match="no IncreLoRA entry"):
        adapters.increlora_init_importance({"w": None})
