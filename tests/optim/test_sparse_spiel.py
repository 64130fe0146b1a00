"""SpIEL step: golden parity with the reference, one trace, invariants (issue 7)."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, masks, optim, tree
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).parent / "golden" / "spiel_ref.npz"


def _setup(g):
    rng = np.random.default_rng(0)
    base = {"w1": jnp.asarray(rng.standard_normal((16, 12)), jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((2, 10, 8)), jnp.float32)}
    a = tree.assign(base, [tree.Rule(where="w1", then=adapters.sparse_delta(k=40)),
                           tree.Rule(where="w2", then=adapters.sparse_delta(k=20))],
                    layout=tree.stacked("w2"))  # w2 is two stacked (10, 8) layers
    st = adapters.init(a, jax.random.key(0), base)
    frozen = {"w1": adapters.SparseSupport(jnp.asarray(g["init_indices/w1"])),
              "w2": adapters.SparseSupport(jnp.stack([jnp.asarray(g["init_indices/w2_0"]),
                                                      jnp.asarray(g["init_indices/w2_1"])]))}
    return a, base, st.trainable, frozen


def _loss(p, batch):
    return jnp.sum(p["w1"] * batch["w1"]) + jnp.sum(p["w2"] * batch["w2"])


def _leaf(state_tree, name):
    """Reference module name -> our array (w2_i is layer i of w2)."""
    if name == "w1":
        return np.asarray(state_tree["w1"])
    return np.asarray(state_tree["w2"])[int(name[-1])]


def test_golden_parity_with_reference_and_single_trace():
    g = np.load(GOLDEN)
    a, base, trainable, frozen = _setup(g)
    opt = optim.sft_adamw(1e-2, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.5)
    opt_state = opt.init(trainable)
    step_fn = optim.make_spiel_step(functools.partial(adapters.materialize, a, base),
                                    _loss, opt, selector=masks.spiel_selector(total_steps=70))
    counted, counter = h.count_traces(step_fn)
    step = jax.jit(counted)
    sstate = optim.spiel_init(trainable, frozen)
    seen = []
    for t in range(46):
        batch = {"w1": jnp.asarray(g["grads/w1"][t]),
                 "w2": jnp.stack([jnp.asarray(g["grads/w2_0"][t]),
                                  jnp.asarray(g["grads/w2_1"][t])])}
        trainable, frozen, opt_state, sstate, _ = step(trainable, frozen, opt_state,
                                                       sstate, batch)
        c = int(sstate.count)
        if c not in g["selections"]:
            continue
        seen.append(c)
        adam = opt_state[0]
        ours = {
            "indices": {p: frozen[p].indices for p in frozen},
            "values": {p: trainable[p].values for p in trainable},
            "exp_avg": {p: adam.mu[p].values for p in trainable},
            "exp_avg_sq": {p: adam.nu[p].values for p in trainable},
            "age": {p: adam.slot_count[p].values + 1 for p in trainable},
        }
        for name in ("w1", "w2_0", "w2_1"):
            np.testing.assert_array_equal(_leaf(ours["indices"], name),
                                          g[f"c{c}/indices/{name}"], err_msg=f"c={c} {name}")
            for key in ("values", "exp_avg", "exp_avg_sq", "age"):
                np.testing.assert_allclose(_leaf(ours[key], name), g[f"c{c}/{key}/{name}"],
                                           **h.MATMUL_F32, err_msg=f"c={c} {key} {name}")
    assert seen == [5, 25, 45]
    assert counter["n"] == 1  # accumulation, regrow and reset_slots: one trace


def test_invariants_through_many_cycles_and_seeded_moments():
    rng = np.random.default_rng(5)
    base = {"w": jnp.zeros((12, 10)), "head": jnp.zeros((10,))}
    a = tree.assign(base, [tree.Rule(where="w", then=adapters.sparse_delta(k=15))])
    st = adapters.init(a, jax.random.key(1), base)
    trainable = dict(st.trainable, head=jnp.zeros((10,)))
    frozen = dict(st.frozen, head=None)
    opt = optim.sft_adamw(1e-2, weight_decay=1.0)

    def mat(t, f):
        p = adapters.materialize(a, base, {"w": t["w"]}, {"w": f["w"]})
        return dict(p, head=t["head"])

    step = jax.jit(optim.make_spiel_step(
        mat, lambda p, b: jnp.sum(p["w"] * b) + jnp.sum(p["head"] * b[0]), opt,
        selector=masks.spiel_selector(total_steps=200, reselection_steps=8,
                                      accumulation_steps=3)))
    ost, ss = opt.init(trainable), optim.spiel_init(trainable, frozen)
    const = jnp.asarray(rng.standard_normal((12, 10)), jnp.float32)
    prev = np.asarray(frozen["w"].indices)
    checked = 0
    window = []
    for _ in range(60):
        g = const + 0.5 * jnp.asarray(rng.standard_normal((12, 10)), jnp.float32)
        if float(ss.samples) == 0:
            window = []
        if bool(ss.phase):
            window.append(np.asarray(g, np.float64))
        trainable, frozen, ost, ss, _ = step(trainable, frozen, ost, ss, g)
        idx = np.asarray(frozen["w"].indices)
        assert idx.shape == (15,) and len(set(idx.tolist())) == 15
        assert idx.min() >= 0 and idx.max() < 120
        assert trainable["w"].values.shape == (15,)
        moved = idx != prev
        if moved.any():
            # Replaced slots restart at 0 (which slots: tests/masks/test_regrow.py
            # against the reference rule, and the golden parity test above).
            assert (np.asarray(trainable["w"].values)[moved] == 0).all()
            # Seeded moments: mu/(1-b1^a) == mean g and nu/(1-b2^a) == mean g²
            # over the a samples of the window (docs/methods.md#spiel).
            adam = ost[0]
            age = np.asarray(adam.slot_count["w"].values)[moved]
            gw = np.stack(window).reshape(len(window), -1)[:, idx[moved]]
            assert np.allclose(age + 1, len(window))
            a_ = age + 1
            np.testing.assert_allclose(np.asarray(adam.mu["w"].values)[moved]
                                       / (1 - 0.9**a_), gw.mean(0), **h.MATMUL_F32)
            np.testing.assert_allclose(np.asarray(adam.nu["w"].values)[moved]
                                       / (1 - 0.999**a_), (gw**2).mean(0), **h.MATMUL_F32)
            checked += 1
        prev = idx
    assert int(ss.count) == 60 and checked >= 3


@pytest.mark.parametrize("policy", ["linear", "cosine"])
def test_works_inside_optax_partition(policy):
    import optax

    base = {"w": jnp.zeros((6, 6)), "b": jnp.zeros((6,))}
    a = tree.assign(base, [tree.Rule(where="w", then=adapters.sparse_delta(k=6))])
    st = adapters.init(a, jax.random.key(2), base)
    trainable = dict(st.trainable, b=jnp.zeros((6,)))
    frozen = dict(st.frozen, b=None)
    opt = optax.partition({"sparse": optim.sft_adamw(0.1), "dense": optax.adam(0.1)},
                          {"w": "sparse", "b": "dense"})

    def mat(t, f):
        return dict(adapters.materialize(a, base, {"w": t["w"]}, {"w": f["w"]}), b=t["b"])

    step = jax.jit(optim.make_spiel_step(
        mat, lambda p, x: jnp.sum((p["w"] - x) ** 2) + jnp.sum(p["b"] ** 2), opt,
        selector=masks.spiel_selector(total_steps=40, reselection_steps=5,
                                      accumulation_steps=2, policy=policy)))
    with jax.numpy_dtype_promotion("standard"):
        ost = opt.init(trainable)
    ss = optim.spiel_init(trainable, frozen)
    target = jnp.eye(6)
    for _ in range(3):
        trainable, frozen, ost, ss, loss = step(trainable, frozen, ost, ss, target)
    # After the first selection (c = 2, p = 1 for linear) the support is the diagonal.
    if policy == "linear":
        assert sorted(np.asarray(frozen["w"].indices).tolist()) == [0, 7, 14, 21, 28, 35]


def test_errors():
    with pytest.raises(ValueError, match="accumulation_steps < reselection_steps"):
        masks.spiel_selector(total_steps=10, reselection_steps=5, accumulation_steps=5)
    with pytest.raises(ValueError, match="policy must be one of"):
        masks.spiel_selector(total_steps=10, policy="step")
    with pytest.raises(TypeError, match="selector must be a peftjax.masks.Selector"):
        optim.make_spiel_step(lambda t, f: t, lambda p, b: 0.0, optim.sft_adamw(0.1),
                              selector=object())
    with pytest.raises(ValueError, match="no sparse deltas"):
        optim.spiel_init({"w": jnp.zeros(3)}, {"w": None})
