"""adapters.validate: the checks every tree-level verb and the factored path share."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, quant, tree


def _params():
    return {"lin": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros((4,))},
            "out": {"kernel": jnp.ones((4, 2))}}


def _assign(params, adapter, where=".*kernel"):
    return tree.assign(params, [tree.Rule(where=where, then=adapter)])


def test_returns_the_bias_leaves_the_hooks_reparametrise(getkey):
    params = _params()
    a = _assign(params, adapters.ssf(), where="lin/kernel")
    state = adapters.init(a, getkey(), params)
    # ssf on lin/kernel also shifts its sibling lin/bias.
    assert adapters.validate(a, params) == {"lin/bias": "lin/kernel"}
    assert adapters.validate(a, params, *state) == {"lin/bias": "lin/kernel"}
    # The map names exactly the leaves fold changes besides the assigned ones.
    t = jax.tree.map(lambda x: x + 0.5, state.trainable)
    folded = adapters.fold(a, params, t, state.frozen)
    changed = {p for p, (x, y) in zip(tree.paths(params), zip(
        jax.tree.leaves(params), jax.tree.leaves(folded), strict=True), strict=True)
        if not np.array_equal(np.asarray(x), np.asarray(y))}
    assert changed == set(a) | {"lin/bias"}
    lora = _assign(params, adapters.lora(2))
    assert adapters.validate(lora, params) == {}


def test_a_path_that_is_not_a_leaf_names_the_caller_and_the_path():
    a = _assign(_params(), adapters.lora(2), where="lin/kernel")
    with pytest.raises(ValueError, match=r"^mine: .*'lin/kernel', which is not a leaf"):
        adapters.validate(a, {"w": jnp.ones((8, 4))}, caller="mine")


def test_a_payload_that_is_not_an_adapter_is_a_type_error():
    with pytest.raises(TypeError, match=r"'lin/kernel' is str .*not a peftjax.adapters"):
        adapters.validate({"lin/kernel": "lora"}, _params())
    with pytest.raises(TypeError, match="assignment must be a dict"):
        adapters.validate([("lin/kernel", adapters.lora(2))], _params())


def test_state_for_another_tree_names_path_and_shapes(getkey):
    params = _params()
    a = _assign(params, adapters.lora(2))
    small = {"lin": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros((4,))},
             "out": {"kernel": jnp.ones((4, 2))}}
    other = adapters.init(a, getkey(), small)
    with pytest.raises(ValueError, match=r"'lin/kernel' \(shape \(8, 4\).*\(6, 2\)"):
        adapters.validate(a, params, *other)
    state = adapters.init(a, getkey(), params)
    fewer = {p: v for p, v in state.trainable.items() if p != "out/kernel"}
    with pytest.raises(ValueError, match=r"trainable lacks \['out/kernel'\]"):
        adapters.validate(a, params, fewer, state.frozen)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.trainable)
    with pytest.raises(TypeError, match="dtype bfloat16.*float32"):
        adapters.validate(a, params, bf16, state.frozen)


def test_trainable_without_frozen_is_a_type_error(getkey):
    params = _params()
    a = _assign(params, adapters.lora(2))
    state = adapters.init(a, getkey(), params)
    with pytest.raises(TypeError, match="both trainable and frozen"):
        adapters.validate(a, params, state.trainable)


def test_is_leaf_keeps_a_quantised_weight_one_leaf(getkey):
    params = _params()
    a = _assign(params, adapters.lora(2), where="lin/kernel")
    state = adapters.init(a, getkey(), params)
    q = dict(params, lin=dict(params["lin"], kernel=quant.quantize(
        params["lin"]["kernel"], quant.int8(block_size=8))))
    # Without is_leaf the quantised array's own fields are the leaves.
    with pytest.raises(ValueError, match="not a leaf of params"):
        adapters.validate(a, q, *state)
    assert adapters.validate(a, q, *state, is_leaf=quant.is_quantized) == {}
