"""reset_slots on optax states (chain, partition, inject_hyperparams), under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import optim
from tests import helpers as h


def _params():
    return {"w": jnp.ones((4,)), "b": jnp.ones((2, 3))}


def _changed():
    return {"w": jnp.array([True, False, False, True]), "b": jnp.zeros((2, 3), bool)}


def _stepped(opt, params):
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(params)
        g = jax.tree.map(lambda x: jnp.full(x.shape, 2.0), params)
        _, state = opt.update(g, state, params)
    return state


def test_adam_in_chain_zeroes_changed_slots_only_and_keeps_count():
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))
    s = _stepped(opt, _params())
    r = jax.jit(optim.reset_slots)(s, _changed())
    adam, radam = s[1][0], r[1][0]
    assert int(radam.count) == int(adam.count) == 1
    for f in ("mu", "nu"):
        got, was = np.asarray(getattr(radam, f)["w"]), np.asarray(getattr(adam, f)["w"])
        np.testing.assert_array_equal(got[[0, 3]], 0.0)
        np.testing.assert_array_equal(got[[1, 2]], was[[1, 2]])
        h.assert_tree_allclose(getattr(radam, f)["b"], getattr(adam, f)["b"], **h.EXACT)
    assert jax.tree.structure(r) == jax.tree.structure(s)


def test_inside_partition_with_masked_nodes_and_seeds():
    labels = {"w": "sparse", "b": "dense"}
    opt = optax.partition({"sparse": optim.sft_adamw(0.1), "dense": optax.adam(0.1)},
                          labels)
    s = _stepped(opt, _params())
    seeds = {"mu": {"w": jnp.full((4,), 7.0), "b": jnp.zeros((2, 3))},
             "slot_count": {"w": jnp.full((4,), 3.0), "b": jnp.zeros((2, 3))}}
    r = optim.reset_slots(s, _changed(), seeds)
    sp = r.inner_states["sparse"].inner_state[0]
    assert sp.mu["w"].tolist() == [7.0, s.inner_states["sparse"].inner_state[0].mu["w"][1],
                                   s.inner_states["sparse"].inner_state[0].mu["w"][2], 7.0]
    assert sp.slot_count["w"].tolist() == [3.0, 1.0, 1.0, 3.0]
    assert sp.nu["w"][0] == 0.0 and sp.nu["w"][1] > 0
    dense_before = s.inner_states["dense"].inner_state[0]
    dense_after = r.inner_states["dense"].inner_state[0]
    h.assert_tree_allclose(dense_after.mu["b"], dense_before.mu["b"], **h.EXACT)


def test_inject_hyperparams_state():
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
    s = _stepped(opt, _params())
    r = optim.reset_slots(s, _changed())
    assert r.hyperparams["learning_rate"] == s.hyperparams["learning_rate"]
    assert r.inner_state[0].mu["w"].tolist()[0] == 0.0


def test_sft_adamw_matches_closed_form():
    """One step: δ' = (δ − lr·m̂/(√v̂·c + eps·c)) (1 − lr·wd) with per-slot ages."""
    opt = optim.sft_adamw(0.1, eps=1e-6, weight_decay=2.0)
    p = {"w": jnp.array([0.5, -1.0])}
    g = {"w": jnp.array([0.3, -2.0])}
    with jax.numpy_dtype_promotion("standard"):
        s = opt.init(p)
        u, s = opt.update(g, s, p)
    gg = h.f64(g["w"])
    m, v = 0.1 * gg, 0.001 * gg**2
    denom = (np.sqrt(v) + 1e-6) * 0.1 / np.sqrt(0.001)
    want = (h.f64(p["w"]) - 0.1 * m / denom) * (1 - 0.1 * 2.0)
    np.testing.assert_allclose(h.f64(p["w"]) + h.f64(u["w"]), want, **h.MATMUL_F32)
