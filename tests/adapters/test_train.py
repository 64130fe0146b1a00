"""The canonical compositions: adapter-only, optimizer-only, hybrid."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax
from peftjax import adapters, tree
from tests import helpers as h


def _problem():
    rng = np.random.default_rng(0)

    def n(*s):
        return jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)

    params = {
        "attn": {"q": {"kernel": n(8, 8)}, "v": {"kernel": n(8, 8)}},
        "mlp": {"up": {"kernel": n(8, 16)}, "down": {"kernel": n(16, 8)}},
        "head": {"kernel": n(8, 3), "bias": jnp.zeros(3, jnp.float32)},
    }
    x = n(32, 8)
    y = jnp.asarray(rng.integers(0, 3, 32), jnp.int32)
    return params, (x, y)


def _loss(p, batch):
    x, y = batch
    hdn = x + jnp.tanh(x @ p["attn"]["q"]["kernel"]) @ p["attn"]["v"]["kernel"]
    hdn = hdn + jax.nn.gelu(hdn @ p["mlp"]["up"]["kernel"]) @ p["mlp"]["down"]["kernel"]
    logits = hdn @ p["head"]["kernel"] + p["head"]["bias"][None, :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _run(step, trainable, opt_state, params, frozen, batch, n=8):
    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
        jstep = jax.jit(step)
        for _ in range(n):
            trainable, opt_state, loss = jstep(trainable, opt_state, params, frozen,
                                               batch)
            losses.append(float(loss))
    return trainable, opt_state, losses


def test_adapter_only_step():
    params, batch = _problem()
    before = jax.tree.map(np.array, params)
    a = tree.assign(params, [tree.Rule(where=r"attn/(q|v)/kernel",
                                       then=adapters.lora(2, alpha=4.0))])
    state = adapters.init(a, jax.random.key(0), params)
    opt = optax.adam(3e-2)
    opt_state = opt.init(state.trainable)
    # Optimizer state holds moments for the adapters only: 2 slots x r(in+out).
    n_train = adapters.num_trainable(state.trainable)
    assert n_train == 2 * 2 * (8 + 8)
    assert peftjax.tree_bytes(opt_state) == 2 * 4 * n_train + 4  # + int32 count
    step = adapters.make_train_step(a, _loss, opt)
    trainable, _, losses = _run(step, state.trainable, opt_state, params,
                                state.frozen, batch)
    assert losses[-1] < losses[0]
    h.assert_tree_allclose(params, before, **h.EXACT)
    assert not np.array_equal(np.asarray(trainable["attn/q/kernel"].b), 0.0)


def test_optimizer_only_partition_with_set_to_zero():
    params, batch = _problem()
    labels = tree.labels(params, [tree.Rule(where=r"mlp/.*", then="adam")],
                         default="frozen")
    opt = optax.partition({"adam": optax.adam(1e-2), "frozen": optax.set_to_zero()},
                          labels)
    opt_state = opt.init(params)

    def step(p, s, batch):
        loss, g = jax.value_and_grad(_loss)(p, batch)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    with jax.numpy_dtype_promotion("standard"):
        new, opt_state, l0 = jax.jit(step)(params, opt_state, batch)
        new, opt_state, l1 = jax.jit(step)(new, opt_state, batch)
    assert float(l1) < float(l0)
    np.testing.assert_array_equal(np.asarray(new["attn"]["q"]["kernel"]),
                                  np.asarray(params["attn"]["q"]["kernel"]))
    assert not np.array_equal(np.asarray(new["mlp"]["up"]["kernel"]),
                              np.asarray(params["mlp"]["up"]["kernel"]))


def test_hybrid_step_lora_plus_full_head():
    params, batch = _problem()
    before = jax.tree.map(np.array, params)
    a = tree.assign(params, [tree.Rule(where=r"attn/(q|v)/kernel",
                                       then=adapters.lora(2, alpha=4.0))])
    state = adapters.init(a, jax.random.key(0), params)
    trainable = adapters.hybrid_init(state, params,
                                     [tree.Rule(where=r"head/.*", then=True)])
    assert sorted(trainable["full"]) == ["head/bias", "head/kernel"]
    labels = adapters.hybrid_labels(trainable, full="adamw")
    opt = optax.partition({"adapters": optax.adam(3e-2),
                           "adamw": optax.adamw(3e-2, weight_decay=0.0)}, labels)
    step = adapters.make_hybrid_train_step(a, _loss, opt)
    new, _, losses = _run(step, trainable, opt.init(trainable), params,
                          state.frozen, batch)
    assert losses[-1] < losses[0]
    h.assert_tree_allclose(params, before, **h.EXACT)
    assert not np.array_equal(np.asarray(new["full"]["head/kernel"]),
                              before["head"]["kernel"])
    # The exported model: splice the head back and merge the adapters.
    exported = adapters.merge(a, adapters.replace_leaves(params, new["full"]),
                              new["adapters"], state.frozen)
    with jax.numpy_dtype_promotion("standard"):
        direct = _loss(adapters.hybrid_materialize(a, params, new, state.frozen),
                       batch)
        via_export = _loss(exported, batch)
    np.testing.assert_allclose(float(via_export), float(direct), **h.MATMUL_F32)


def test_hybrid_rejects_overlap():
    params, _ = _problem()
    a = tree.assign(params, [tree.Rule(where=r"head/kernel", then=adapters.lora(2))])
    state = adapters.init(a, jax.random.key(0), params)
    try:
        adapters.hybrid_init(state, params, [tree.Rule(where=r"head/.*", then=True)])
    except ValueError as e:
        assert "head/kernel" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_param_count_prints():
    params, _ = _problem()
    a = tree.assign(params, [tree.Rule(where=r"attn/q/kernel", then=adapters.lora(2))])
    state = adapters.init(a, jax.random.key(0), params)
    c = peftjax.count_params(params, state.trainable)
    assert (c.trainable, c.total) == (32, 32 + 64 * 2 + 128 * 2 + 24 + 3)
    assert str(c).startswith("trainable params: 32 || all params: 443")
