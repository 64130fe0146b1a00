"""LISA (docs/methods.md#lisa): tests (active counts, always-on leaves, policies)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import optim
from tests.helpers import ELEMENTWISE_F32, MATMUL_F32, assert_tree_allclose, f64

L = 4


def _params():
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {
        "embed": normal(5, 3),
        "head": normal(3, 5),
        "layers": {str(i): {"w": normal(3, 3), "b": normal(3)} for i in range(L)},
    }


def _run(tx, grads, params):
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs, states = [], [state]
    for g in grads:
        u, state = update(g, state, params)
        outs.append(u)
        states.append(state)
    return outs, states


def _grads(params, n, seed=1):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                         params) for _ in range(n)]


def test_active_layers_and_always_trained_leaves():
    p = _params()
    tx = optim.scale_by_lisa(L, n_active=2, interval=3,
                             inner=optim.scale_by_adam_hf())
    outs, states = _run(tx, _grads(p, 7), p)
    for k, u in enumerate(outs):
        on = [i for i in range(L) if np.any(f64(u["layers"][str(i)]["w"]) != 0)]
        assert len(on) == 2
        assert on == sorted(np.asarray(states[k + 1].active).tolist())
        assert np.all(f64(u["embed"]) != 0) and np.all(f64(u["head"]) != 0)
    periods = [tuple(np.asarray(s.active)) for s in states[1:]]
    assert periods[0] == periods[1] == periods[2] and periods[3] == periods[4]


def test_keep_policy_freezes_moments_and_resumes():
    p = _params()
    tx = optim.scale_by_lisa(L, n_active=1, interval=2, inner=optim.scale_by_adam_hf(),
                             key=3)
    _, states = _run(tx, _grads(p, 20), p)
    for k in range(1, len(states)):
        act = set(np.asarray(states[k].active).tolist())
        for i in set(range(L)) - act:
            before = states[k - 1].inner_state.mu["layers"][str(i)]["w"]
            after = states[k].inner_state.mu["layers"][str(i)]["w"]
            np.testing.assert_array_equal(f64(after), f64(before))
    # a layer re-activated after a gap resumes from its old, non-zero moments
    acts = [int(states[2 * q + 1].active[0]) for q in range(10)]  # per period
    resumed = [q for q in range(2, 10)
               if acts[q] != acts[q - 1] and acts[q] in acts[:q - 1]]
    assert resumed, acts
    q = resumed[0]
    old = states[2 * q].inner_state.mu["layers"][str(acts[q])]["w"]
    assert np.all(f64(old) != 0)


def test_reset_policy_stacked_state_is_gathered():
    rng = np.random.default_rng(2)
    p = {"embed": jnp.ones((5, 3)),
         "layers": {"w": jnp.asarray(rng.standard_normal((L, 3, 3)), jnp.float32)}}
    tx = optim.scale_by_lisa(L, n_active=2, interval=2, layers=None,
                             stacked=r"layers/.*", state_policy="reset",
                             inner=optim.scale_by_adam_hf())
    outs, states = _run(tx, _grads(p, 5), p)
    assert states[0].inner_state.mu["layers"]["w"].shape == (2, 3, 3)
    assert states[0].inner_state.mu["embed"].shape == (5, 3)
    for u, s in zip(outs, states[1:], strict=True):
        on = [i for i in range(L) if np.any(f64(u["layers"]["w"][i]) != 0)]
        assert on == np.asarray(s.active).tolist()
    # reset at each re-selection: the first step of a period is sign-like
    assert int(states[3].inner_state.count) == 1


def test_keep_equals_adam_on_trained_leaves_when_all_active():
    p = _params()
    grads = _grads(p, 3)
    a, _ = _run(optim.scale_by_lisa(L, n_active=L, inner=optim.scale_by_adam_hf()),
                grads, p)
    b, _ = _run(optim.scale_by_adam_hf(), grads, p)
    assert_tree_allclose(a, b, **MATMUL_F32)


def test_weight_decay_only_on_trained_leaves():
    p = _params()
    zero = jax.tree.map(jnp.zeros_like, p)
    tx = optim.lisa(0.1, L, n_active=1, weight_decay=0.5, inner=optax.identity())
    u, s = tx.update(zero, tx.init(p), p)
    act = int(s[0].active[0])
    for i in range(L):
        expect = -0.05 * f64(p["layers"][str(i)]["w"]) if i == act else 0.0
        np.testing.assert_allclose(f64(u["layers"][str(i)]["w"]), expect,
                                   **ELEMENTWISE_F32)


def test_errors():
    with pytest.raises(ValueError, match="n_active"):
        optim.scale_by_lisa(2, n_active=3)
    with pytest.raises(ValueError, match="state_policy"):
        optim.scale_by_lisa(2, state_policy="drop")
    with pytest.raises(ValueError, match="no leaf matches"):
        optim.scale_by_lisa(2, n_active=1).init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"'layers/w'.*\(3, 2\)"):
        optim.scale_by_lisa(2, n_active=1, stacked="layers/.*").init(
            {"layers": {"w": jnp.ones((3, 2))}})
