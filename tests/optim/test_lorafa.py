"""LoRA-FA: PEFT's trajectories, frozen a (no update, no moments), scanned stacks, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, optim, train, tree
from tests.helpers import EXACT, MATMUL_F32, assert_tree_allclose
from tests.optim import golden_lora_net as net

# PEFT create_lorafa_optimizer(r=4, lora_alpha=8, lr=1e-2), 8 steps, float32.
CASES = {
    "lorafa": dict(scaling=2.0, weight_decay=0.05),
    "lorafa_rslora": dict(scaling=adapters.scaling_value(
        adapters.Scaling.ALPHA_OVER_SQRT_RANK, 8.0, 4)),
    "lorafa_autocast": dict(scaling=2.0, weight_decay=0.05, projection_dtype=jnp.bfloat16),
}


@pytest.fixture(scope="module")
def golden():
    return net.load()


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_trajectory(golden, case):
    kw = CASES[case]
    traj, losses, state = net.trajectory(optim.lorafa(1e-2, **kw), golden, kw["scaling"], 8)
    net.assert_matches(golden, case, traj, losses, **MATMUL_F32)
    for layer in ("fc1", "fc2"):  # A never moves (weight decay included)
        np.testing.assert_array_equal(traj[f"{layer}_a"][-1], golden[f"init/{layer}_a"])
    # ... and holds no Adam moments
    adam = state[1].inner_states["train"].inner_state[0]
    assert isinstance(adam.mu["fc1/kernel"]["a"], optax.MaskedNode)
    assert adam.mu["fc1/kernel"]["b"].shape == (4, 12)
    n_state = sum(x.size for x in jax.tree.leaves(state))
    n_trainable = sum(x.size for x in jax.tree.leaves(net.init_trainable(golden)))
    assert n_state == 2 * (n_trainable - 8 * 4 - 12 * 4) + 3  # mu, nu of b and bias; 3 counts


def test_autocast_emulation_is_needed(golden):
    # PEFT's bfloat16 autocast moves the trajectory by more than the tolerance.
    ref = golden["traj/lorafa_autocast/fc1_b"]
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(golden["traj/lorafa/fc1_b"], ref, **MATMUL_F32)


def test_scanned_stack_and_per_pair_scaling():
    rng = np.random.default_rng(0)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    a, b = n(3, 5, 2), n(3, 2, 4)
    p = {"stack": {"a": a, "b": b}, "one": {"a": a[1], "b": b[1]},
         "eye": {"a": jnp.eye(3, 2), "b": jnp.ones((2, 4))}}
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), p)
    g["one"]["b"] = g["stack"]["b"][1]
    tx = optim.scale_by_lorafa({"stack": 0.5, "one": 0.5, "eye": 2.0})
    u, _ = jax.jit(tx.update)(g, tx.init(p), p)
    assert_tree_allclose(jax.tree.map(lambda x: x[1], u["stack"]), u["one"], **MATMUL_F32)
    ref = 4.0 * np.linalg.solve(np.asarray(a[1]).T @ np.asarray(a[1]), np.asarray(g["one"]["b"]))
    np.testing.assert_allclose(u["stack"]["b"][1], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(u["eye"]["b"], 0.25 * g["eye"]["b"], rtol=1e-6)
    assert_tree_allclose(u["stack"]["a"], jnp.zeros_like(a), **EXACT)
    with pytest.raises(ValueError, match=r"no entry for the LoRA pair at 'eye'"):
        optim.scale_by_lorafa({"stack": 1.0}).update(g, tx.init(p), p)


def test_errors_name_the_paths():
    with pytest.raises(ValueError, match=r"no LoRA factor pair.*dense/kernel \(2, 3\)"):
        optim.lorafa(1e-2).init({"dense/kernel": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match=r"'q/kernel' has shapes a \(3, 2\) and b \(3, 4\)"):
        optim.lorafa(1e-2).init({"q/kernel": {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 4))}})
    p = {"q": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 4))}}
    tx = optim.scale_by_lorafa()
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p))


def test_trains_through_train_trainer_with_a_scanned_stack():
    rng = np.random.default_rng(1)
    n = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)  # noqa: E731
    params = {"w1": n(4, 8), "stack": n(2, 8, 8), "w2": n(8, 3)}  # stack: two (8, 8) layers
    batch = {"x": n(16, 4), "y": n(16, 3)}

    def loss_fn(p, batch):
        h = jnp.tanh(batch["x"] @ p["w1"])
        for i in range(2):
            h = jnp.tanh(h @ p["stack"][i])
        return jnp.mean((h @ p["w2"] - batch["y"]) ** 2)

    s = adapters.scaling_value(adapters.Scaling.ALPHA_OVER_RANK, 8.0, 2)
    assignment = tree.assign(params, [tree.Rule(where="w1|stack", then=adapters.lora(2))],
                             layout=tree.stacked("stack"))
    t = train.trainer(loss_fn, optim.lorafa(3e-2, scaling=s, weight_decay=0.01),
                      adapters=assignment)
    state = t.init(jax.random.key(0), params)
    a0 = {k: np.array(v) for k, v in tree.leaves_by_path(state.trainable).items()}
    assert a0["stack/a"].shape == (2, 8, 2)
    losses = []
    for _ in range(6):
        state, metrics = t.step(state, batch, params)
        losses.append(float(metrics["loss"]))
    flat = tree.leaves_by_path(state.trainable)
    for path in ("w1/a", "stack/a"):
        np.testing.assert_array_equal(flat[path], a0[path])
    assert np.abs(np.asarray(flat["stack/b"]) - a0["stack/b"]).min() > 0
    assert losses[-1] < losses[0]
