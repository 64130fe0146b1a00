"""SpIEL through train.trainer(sparse=...): golden parity, one trace, invariants, skips."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, masks, optim, train, tree
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).parent.parent / "optim" / "golden" / "spiel_ref.npz"


def _host(t):
    return jax.tree.map(np.asarray, t)


def _setup(g):
    rng = np.random.default_rng(0)
    base = {"w1": jnp.asarray(rng.standard_normal((16, 12)), jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((2, 10, 8)), jnp.float32)}
    a = tree.assign(base, [tree.Rule(where="w1", then=adapters.sparse_delta(k=40)),
                           tree.Rule(where="w2", then=adapters.sparse_delta(k=20))],
                    layout=tree.stacked("w2"))  # w2 is two stacked (10, 8) layers
    frozen = {"w1": adapters.SparseSupport(jnp.asarray(g["init_indices/w1"])),
              "w2": adapters.SparseSupport(jnp.stack([jnp.asarray(g["init_indices/w2_0"]),
                                                      jnp.asarray(g["init_indices/w2_1"])]))}
    return a, base, frozen


def _loss(p, batch):
    return jnp.sum(p["w1"] * batch["w1"]) + jnp.sum(p["w2"] * batch["w2"])


def _leaf(state_tree, name):
    """Reference module name -> our array (w2_i is layer i of w2)."""
    if name == "w1":
        return np.asarray(state_tree["w1"])
    return np.asarray(state_tree["w2"])[int(name[-1])]


def test_golden_parity_with_reference_and_single_trace():
    g = np.load(GOLDEN)
    a, base, frozen = _setup(g)
    opt = optim.sft_adamw(1e-2, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.5)
    counted, counter = h.count_traces(_loss)
    t = train.trainer(counted, opt, adapters=a,
                      sparse=masks.spiel_selector(total_steps=70))
    state = t.init(jax.random.key(0), base)
    state = state._replace(frozen=frozen)  # the reference's initial supports
    assert isinstance(state.opt_state[1], train.SpIELState)
    seen, traced = [], None
    for step in range(46):
        batch = {"w1": jnp.asarray(g["grads/w1"][step]),
                 "w2": jnp.stack([jnp.asarray(g["grads/w2_0"][step]),
                                  jnp.asarray(g["grads/w2_1"][step])])}
        state, _ = t.step(state, batch, base)
        traced = counter["n"] if traced is None else traced
        c = int(state.opt_state[1].count)
        if c not in g["selections"]:
            continue
        seen.append(c)
        adam = state.opt_state[0][0]
        tr, fr = state.trainable, state.frozen
        ours = {
            "indices": {p: fr[p].indices for p in fr},
            "values": {p: tr[p].values for p in tr},
            "exp_avg": {p: adam.mu[p].values for p in tr},
            "exp_avg_sq": {p: adam.nu[p].values for p in tr},
            "age": {p: adam.slot_count[p].values + 1 for p in tr},
        }
        for name in ("w1", "w2_0", "w2_1"):
            np.testing.assert_array_equal(_leaf(ours["indices"], name),
                                          g[f"c{c}/indices/{name}"], err_msg=f"c={c} {name}")
            for key in ("values", "exp_avg", "exp_avg_sq", "age"):
                np.testing.assert_allclose(_leaf(ours[key], name), g[f"c{c}/{key}/{name}"],
                                           **h.MATMUL_F32, err_msg=f"c={c} {key} {name}")
    assert seen == [5, 25, 45]
    # accumulation, regrow and reset_slots: traced in the first call only
    assert traced > 0 and counter["n"] == traced


def _hybrid(base, k, opt, selector, loss, accumulate=1):
    a = tree.assign(base, [tree.Rule(where="w", then=adapters.sparse_delta(k=k))])
    dense = [p for p in base if p != "w"]
    return train.trainer(loss, opt, adapters=a, sparse=selector, accumulate=accumulate,
                         full=[tree.Rule(where="|".join(dense), then=True)])


def test_invariants_through_many_cycles_and_seeded_moments():
    rng = np.random.default_rng(5)
    base = {"w": jnp.zeros((12, 10)), "head": jnp.zeros((10,))}
    opt = optim.sft_adamw(1e-2, weight_decay=1.0)
    t = _hybrid(base, 15, opt,
                masks.spiel_selector(total_steps=200, reselection_steps=8,
                                     accumulation_steps=3),
                lambda p, b: jnp.sum(p["w"] * b) + jnp.sum(p["head"] * b[0]))
    state = t.init(jax.random.key(1), base)
    const = jnp.asarray(rng.standard_normal((12, 10)), jnp.float32)
    prev = np.asarray(state.frozen["w"].indices)
    checked = 0
    window = []
    for _ in range(60):
        g = const + 0.5 * jnp.asarray(rng.standard_normal((12, 10)), jnp.float32)
        ss = state.opt_state[1]
        if float(ss.samples) == 0:
            window = []
        if bool(ss.phase):
            window.append(np.asarray(g, np.float64))
        state, _ = t.step(state, g, base)
        idx = np.asarray(state.frozen["w"].indices)
        values = np.asarray(state.trainable["adapters"]["w"].values)
        assert idx.shape == (15,) and len(set(idx.tolist())) == 15
        assert idx.min() >= 0 and idx.max() < 120
        assert values.shape == (15,)
        moved = idx != prev
        if moved.any():
            # Replaced slots restart at 0 (which slots: tests/masks/test_regrow.py
            # against the reference rule, and the golden parity test above).
            assert (values[moved] == 0).all()
            # Seeded moments: mu/(1-b1^a) == mean g and nu/(1-b2^a) == mean g²
            # over the a samples of the window (docs/methods.md#spiel).
            adam = state.opt_state[0][0]
            age = np.asarray(adam.slot_count["adapters"]["w"].values)[moved]
            gw = np.stack(window).reshape(len(window), -1)[:, idx[moved]]
            assert np.allclose(age + 1, len(window))
            a_ = age + 1
            np.testing.assert_allclose(np.asarray(adam.mu["adapters"]["w"].values)[moved]
                                       / (1 - 0.9**a_), gw.mean(0), **h.MATMUL_F32)
            np.testing.assert_allclose(np.asarray(adam.nu["adapters"]["w"].values)[moved]
                                       / (1 - 0.999**a_), (gw**2).mean(0), **h.MATMUL_F32)
            checked += 1
        prev = idx
    assert int(state.opt_state[1].count) == 60 and checked >= 3
    # The dense leaf trained next to the deltas.
    assert not np.allclose(np.asarray(state.trainable["full"]["head"]), 0.0)


@pytest.mark.parametrize("policy", ["linear", "cosine"])
def test_works_inside_optax_partition(policy):
    base = {"w": jnp.zeros((6, 6)), "b": jnp.zeros((6,))}
    opt = optax.partition({"sparse": optim.sft_adamw(0.1), "dense": optax.adam(0.1)},
                          train.hybrid_labels(adapters="sparse", full="dense"))
    t = _hybrid(base, 6, opt,
                masks.spiel_selector(total_steps=40, reselection_steps=5,
                                     accumulation_steps=2, policy=policy),
                lambda p, x: jnp.sum((p["w"] - x) ** 2) + jnp.sum(p["b"] ** 2))
    state = t.init(jax.random.key(2), base)
    target = jnp.eye(6)
    losses = []
    for _ in range(4):
        state, m = t.step(state, target, base)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]  # (trains on the diagonal once it is the support)
    # After the first selection (c = 2, p = 1 for linear) the support is the diagonal.
    if policy == "linear":
        assert sorted(np.asarray(state.frozen["w"].indices).tolist()) == [0, 7, 14, 21, 28, 35]


def test_accumulate_counts_micro_batches_as_samples():
    # Two identical micro-batches per update = one batch per update: the same
    # candidates, means and ages (samples / accumulate), so the same run.
    base = {"w": jnp.zeros((8, 8)), "b": jnp.zeros((8,))}
    sel = masks.spiel_selector(total_steps=30, reselection_steps=4, accumulation_steps=2)

    def loss(p, x):
        return jnp.sum(p["w"] * x) + 0.5 * jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] * x[0])

    runs = []
    for acc in (1, 2):
        t = _hybrid(base, 10, optim.sft_adamw(5e-2), sel, loss, accumulate=acc)
        state = t.init(jax.random.key(3), base)
        for i in range(10):
            x = jnp.asarray(np.random.default_rng(i).standard_normal((8, 8)), jnp.float32)
            state, _ = t.step(state, x if acc == 1 else jnp.stack([x, x]), base)
        runs.append(_host((state.trainable, state.frozen, state.opt_state)))
    np.testing.assert_array_equal(runs[0][1]["w"].indices, runs[1][1]["w"].indices)
    h.assert_tree_allclose(runs[0][:2], runs[1][:2], **h.MATMUL_F32)  # params, supports
    h.assert_tree_allclose(runs[0][2][0], runs[1][2][0], **h.MATMUL_F32)  # Adam moments
    one, two = runs[0][2][1], runs[1][2][1]
    assert int(one.count) == int(two.count) == 10
    # The accumulators sum over micro-batches: twice the sums, twice the samples.
    h.assert_tree_allclose((2 * one.grad_sum["w"], 2 * one.gradsq_sum["w"]),
                           (two.grad_sum["w"], two.gradsq_sum["w"]), **h.MATMUL_F32)


def _nan_setup():
    rng = np.random.default_rng(3)
    base = {"w": jnp.asarray(rng.standard_normal((12, 10)), jnp.float32)}
    a = tree.assign(base, [tree.Rule(where="w", then=adapters.sparse_delta(k=15))])
    return a, base


def _nan_loss(p, batch):
    return jnp.sum(p["w"] * batch) + 0.5 * jnp.sum(p["w"] ** 2 * jnp.abs(batch))


def _run(t, base, batches):
    state = t.init(jax.random.key(0), base)
    init_indices = np.asarray(state.frozen["w"].indices)
    skipped = []
    for b in batches:
        before = _host((state.trainable, state.frozen, state.opt_state))
        state, m = t.step(state, b, base)
        skipped.append(int(m["skipped"]))
        if skipped[-1]:  # unchanged, not recomputed
            h.assert_tree_allclose(_host((state.trainable, state.frozen, state.opt_state)),
                                   before, **h.EXACT)
    return state, skipped, init_indices


# Reselection every 4 steps after 2 accumulated batches: the second call closes
# the first phase (regrowth), the sixth the second.
SELECTOR = masks.spiel_selector(total_steps=12, reselection_steps=4, accumulation_steps=2)


@pytest.mark.parametrize("at", [1, 3], ids=["on_a_regrowth_step", "outside_a_phase"])
def test_spiel_step_skips_a_nan_batch(at):
    a, base = _nan_setup()
    rng = np.random.default_rng(4)
    batches = [jnp.asarray(rng.standard_normal((12, 10)), jnp.float32) for _ in range(8)]
    t = train.trainer(_nan_loss, optim.sft_adamw(1e-1), adapters=a, sparse=SELECTOR)
    ref, s_ref, init_indices = _run(t, base, batches)
    bad = batches[:at] + [jnp.full_like(batches[at], jnp.nan)] + batches[at:]
    got, s, _ = _run(t, base, bad)
    assert sum(s_ref) == 0 and s == [int(i == at) for i in range(9)]
    np.testing.assert_array_equal(got.frozen["w"].indices, ref.frozen["w"].indices)
    h.assert_tree_allclose(_host((got.trainable, got.opt_state)),
                           _host((ref.trainable, ref.opt_state)), **h.MATMUL_F32)
    assert int(got.opt_state[1].count) == len(batches)  # optimizer updates
    assert int(got.step) == len(bad)  # calls, the skipped one included
    # The run did regrow: the support moved away from its initial draw.
    assert not np.array_equal(np.sort(got.frozen["w"].indices), np.sort(init_indices))

    raw = train.trainer(_nan_loss, optim.sft_adamw(1e-1), adapters=a, sparse=SELECTOR,
                        skip_nonfinite=False)
    got, s, _ = _run(raw, base, bad)
    assert sum(s) == 0
    assert np.isnan(h.f64(got.trainable["w"].values)).all()
    assert np.isnan(h.f64(got.opt_state[0][0].mu["w"].values)).all()


def test_errors():
    with pytest.raises(ValueError, match="accumulation_steps < reselection_steps"):
        masks.spiel_selector(total_steps=10, reselection_steps=5, accumulation_steps=5)
    with pytest.raises(ValueError, match="policy must be one of"):
        masks.spiel_selector(total_steps=10, policy="step")
    base = {"w": jnp.zeros((4, 3))}
    lora = tree.assign(base, [tree.Rule(where="w", then=adapters.lora(1))])
    with pytest.raises(TypeError, match="selector must be a peftjax.masks.Selector"):
        train.trainer(_nan_loss, optim.sft_adamw(0.1), adapters=lora, sparse=object())
    with pytest.raises(ValueError, match="SpIELConfig.b2 must be a float in"):
        train.trainer(_nan_loss, optim.sft_adamw(0.1), adapters=lora,
                      sparse=train.SpIELConfig(SELECTOR, b2=1.5))
    t = train.trainer(_nan_loss, optim.sft_adamw(0.1), adapters=lora, sparse=SELECTOR)
    with pytest.raises(ValueError, match="needs sparse deltas among the adapters.*'w'"):
        t.init(jax.random.key(0), base)


def test_config_betas_seed_the_regrown_moments():
    # Same run, other seeding betas: the regrown slots' moments scale by
    # (1 - b^a) exactly as the formula says.
    base = {"w": jnp.zeros((6, 6))}
    a = tree.assign(base, [tree.Rule(where="w", then=adapters.sparse_delta(k=6))])
    sel = masks.spiel_selector(total_steps=40, reselection_steps=5, accumulation_steps=2)
    mus = []
    for b1 in (0.9, 0.5):
        t = train.trainer(lambda p, x: jnp.sum((p["w"] - x) ** 2), optim.sft_adamw(0.0),
                          adapters=a, sparse=train.SpIELConfig(sel, b1=b1))
        state = t.init(jax.random.key(2), base)
        first = np.asarray(state.frozen["w"].indices)
        for _ in range(2):  # the second call closes the first phase (age a = 2)
            state, _ = t.step(state, jnp.eye(6), base)
        regrown = np.asarray(state.frozen["w"].indices) != first
        mus.append(np.asarray(state.opt_state[0][0].mu["w"].values, np.float64)[regrown])
    assert mus[0].size and np.abs(mus[0]).min() > 0
    np.testing.assert_allclose(mus[1] * (1 - 0.9**2), mus[0] * (1 - 0.5**2), **h.MATMUL_F32)
