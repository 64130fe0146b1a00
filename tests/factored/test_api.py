"""peftjax.factored.transform: equal to materialize on stock and peftjax models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, factored, train, tree
from tests.factored.conftest import MODELS, build, scalar_loss
from tests.helpers import GRAD_F32, MATMUL_F32, assert_tree_allclose

ADAPTERS = {
    "lora": lambda dn: adapters.lora(2, alpha=4.0, dimension_numbers=dn),
    "dora": lambda dn: adapters.dora(2, alpha=4.0, dimension_numbers=dn),
    "lora_xs": lambda dn: adapters.lora_xs(2, core_init_std=0.1, dimension_numbers=dn),
    "ia3_in": lambda dn: adapters.scale_shift(side=adapters.Side.INPUT, init_std=0.1,
                                              dimension_numbers=dn),
    "scale_out": lambda dn: adapters.scale_shift(init_std=0.1, dimension_numbers=dn),
}


def _setup(zoo, make):
    name, (apply_fn, params, x, targets) = zoo
    rules = [tree.Rule(where=w, then=make(dn)) for w, dn in targets.items()]
    assignment = tree.assign(params, rules)
    state = adapters.init(assignment, jax.random.key(0), params)
    # Move away from the identity so that every term contributes.
    leaves, td = jax.tree.flatten(state.trainable)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    trainable = jax.tree.unflatten(td, [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)])
    return apply_fn, params, x, assignment, trainable, state.frozen


# LoRA on every variant (unrolled, scan, remat); each other adapter on the
# scanned variants of one or two families, so every family sees an input
# scale, an output scale and a non-LoRA delta (each case compiles two
# gradients of a scanned model: the suite's time budget, not its reach).
_SCANNED = {"dora": ("llama_scan_remat",), "lora_xs": ("linen_scan",),
            "ia3_in": ("nnx_scan_remat", "llama_scan_remat"),
            "scale_out": ("linen_scan", "nnx_scan_remat")}
CASES = sorted({(m, a) for a, ms in _SCANNED.items() for m in ms}
               | {(m, "lora") for m in MODELS})
assert set(_SCANNED) | {"lora"} == set(ADAPTERS), "each adapter needs its scanned families"


@pytest.mark.parametrize(("model", "adapter"), CASES)
def test_outputs_and_grads_match_materialize(model, adapter):
    apply_fn, params, x, assignment, trainable, frozen = _setup(
        (model, build(model)), ADAPTERS[adapter])

    def both(t):
        def ref(t):
            y = apply_fn(adapters.materialize(assignment, params, t, frozen), x)
            return scalar_loss(y), y

        def fac(t):
            y = factored.transform(apply_fn, assignment, t, frozen)(params, x)
            return scalar_loss(y), y

        return (jax.grad(ref, has_aux=True)(t), jax.grad(fac, has_aux=True)(t))

    (g_ref, y_ref), (g, y) = jax.jit(both)(trainable)
    # The outputs are sums over features that partly cancel: compare relative
    # to the output's scale (MATMUL_F32's rtol), not elementwise.
    scale = float(jnp.max(jnp.abs(y_ref)))
    assert_tree_allclose(y, y_ref, rtol=MATMUL_F32["rtol"],
                         atol=MATMUL_F32["rtol"] * scale)
    # Gradients of a sum of squares through two layers: GRAD_F32.
    assert_tree_allclose(g, g_ref, **GRAD_F32)


@pytest.mark.parametrize("name", sorted(n for n in MODELS if "scan" in n))
def test_stacked_adapters_stay_stacked_and_step_compiles_once(name):
    zoo = (name, build(name))
    apply_fn, params, x, assignment, trainable, frozen = _setup(zoo, ADAPTERS["lora"])
    flat = dict(tree.flatten(params))
    for path, t in trainable.items():
        w = flat[path]
        assert t.a.shape[0] == w.shape[0], path  # one adapter per layer, stacked
    traces = 0

    def loss_fn(p, batch):
        nonlocal traces
        traces += 1
        return scalar_loss(apply_fn(p, batch))

    t = train.trainer(loss_fn, optax.adam(1e-2), adapters=assignment)  # factored
    state = t.init(jax.random.key(0), params,
                   state=adapters.AdapterState(trainable, frozen))
    losses = []
    for _ in range(3):
        state, m = t.step(state, x, params)
        losses.append(float(m["loss"]))
    assert traces == 1
    assert losses[-1] < losses[0]


def test_dropout_needs_key_and_is_deterministic_per_key():
    params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2, dropout=0.5))])
    s = adapters.init(a, jax.random.key(0), params)
    t = {"w": s.trainable["w"]._replace(b=jnp.ones((2, 5)))}
    f = lambda p, x: x @ p["w"]  # noqa: E731
    x = jnp.ones((3, 6))
    with pytest.raises(ValueError, match="dropout"):
        factored.transform(f, a, t, s.frozen)
    y1 = factored.transform(f, a, t, s.frozen, key=jax.random.key(1))(params, x)
    y2 = factored.transform(f, a, t, s.frozen, key=jax.random.key(1))(params, x)
    y3 = factored.transform(f, a, t, s.frozen, key=jax.random.key(2))(params, x)
    ev = factored.transform(f, a, t, s.frozen, deterministic=True)(params, x)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, y3)
    ref = f(adapters.materialize(a, params, t, s.frozen, deterministic=True), x)
    assert_tree_allclose(ev, ref, **MATMUL_F32)
    # Dropout acts on the adapter input only: y = x@W + s·(mask ⊙ x / 0.5)@A@B,
    # with the mask drawn from fold_in(path_key(key, path), use index).
    k = jax.random.fold_in(adapters.path_key(jax.random.key(1), "w"), 0)
    keep = jax.random.bernoulli(k, 0.5, x.shape)
    xd = jnp.where(keep, x / 0.5, jnp.zeros_like(x))
    delta = adapters.materialize(a, {"w": jnp.zeros((6, 5))}, t, s.frozen,
                                 deterministic=True)["w"]
    assert_tree_allclose(y1, x @ params["w"] + xd @ delta, **MATMUL_F32)


def test_state_from_another_tree_names_the_path():
    params = {"w": jnp.ones((4, 3))}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
    s = adapters.init(a, jax.random.key(0), {"w": jnp.ones((5, 3))})
    with pytest.raises(ValueError, match="'w'"):
        factored.transform(lambda p, x: x @ p["w"], a, *s)(params, jnp.ones((1, 4)))
