"""Canonical paths agree across dicts, Linen, nnx.State and Equinox."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from peftjax import tree


class _NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.dense1 = nnx.Linear(4, 6, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(6, 6, rngs=rngs) for _ in range(2)])
        self.dropout = nnx.Dropout(0.1, rngs=rngs)


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, name="dense1")(x)
        for i in range(2):
            x = nn.Dense(6, name=f"layers_{i}")(x)
        return x


def test_nnx_state_pure_dict_and_raw_dict_agree():
    model = _NnxMLP(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    raw = jax.tree.map(np.asarray, pure)
    expected = [
        "dense1/bias", "dense1/kernel",
        "layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel",
    ]
    assert tree.paths(state) == expected
    assert tree.paths(pure) == expected
    assert tree.paths(raw) == expected


def test_nnx_full_state_contains_rng_paths_without_value_suffix():
    model = _NnxMLP(nnx.Rngs(0))
    ps = tree.paths(nnx.state(model))
    assert "dropout/rngs/key" in ps and not any(p.endswith("/value") for p in ps)


def test_linen_params_paths():
    params = _LinenMLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    assert tree.paths(params) == [
        "dense1/bias", "dense1/kernel", "layers_0/bias", "layers_0/kernel",
        "layers_1/bias", "layers_1/kernel",
    ]


def test_equinox_linear_out_in_paths():
    lin = eqx.nn.Linear(3, 4, key=jax.random.key(0))
    assert tree.paths(lin) == ["weight", "bias"]
    assert lin.weight.shape == (4, 3)  # (out, in): needs explicit dims


def test_colliding_paths_raise():
    bad = {"a/b": jnp.zeros(1), "a": {"b": jnp.zeros(1)}}
    with pytest.raises(ValueError, match="share the canonical path 'a/b'"):
        tree.paths(bad)
    # Int 0 next to str "0" under one dict cannot even be flattened by JAX; in
    # sibling containers they collide.
    with pytest.raises(ValueError, match="share the canonical path 'x/0'"):
        tree.paths({"x": [jnp.zeros(1)], "x/0": jnp.zeros(1)})


def test_map_with_path_keeps_structure():
    p = {"a": {"b": jnp.ones(2)}, "c": [jnp.ones(1)]}
    out = tree.map_with_path(lambda path, x: path, p)
    assert out == {"a": {"b": "a/b"}, "c": ["c/0"]}


def test_replace_leaves_replaces_named_paths_and_rejects_unknown_ones():
    params = {"a": jnp.ones(2), "b": {"c": jnp.zeros((2, 3))}}
    new = jnp.full((4,), 7.0)
    out = tree.replace_leaves(params, {"b/c": new})
    assert out["b"]["c"] is new and out["a"] is params["a"]
    assert jax.tree.structure(out) == jax.tree.structure(params)
    with pytest.raises(ValueError, match=r"paths not in the tree: \['b/d'\].*'b/c'"):
        tree.replace_leaves(params, {"b/d": new})
