"""Bad input gives a clear error naming path, shape and argument, and changes
nothing (issue: foundation, item 7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def _params():
    return {
        "attn": {"q": {"kernel": jnp.ones((8, 6))}, "k": {"kernel": jnp.ones((8, 6))}},
        "norm": {"scale": jnp.ones(8)},
        "ids": {"table": jnp.zeros((4, 4), jnp.int32)},
    }


def _snapshot(p):
    return jax.tree.map(np.array, p)


def test_regex_matching_nothing():
    p = _params()
    before = _snapshot(p)
    with pytest.raises(ValueError, match=r"attn/v/kernel.*closest existing paths"):
        tree.assign(p, [tree.Rule(where="attn/v/kernel", then=adapters.lora(2))])
    h.assert_tree_allclose(p, before, **h.EXACT)


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_not_positive(rank):
    with pytest.raises(ValueError, match=f"rank must be > 0, got rank={rank}"):
        adapters.lora(rank)
    with pytest.raises(ValueError, match="rank must be > 0"):
        adapters.lora_xs(rank)
    with pytest.raises(TypeError, match="positive int"):
        adapters.dora(2.0)


def test_rank_larger_than_matrix():
    p = _params()
    a = tree.assign(p, [tree.Rule(where="attn/q/kernel", then=adapters.lora(7))])
    with pytest.raises(ValueError) as e:
        adapters.init(a, jax.random.key(0), p)
    msg = str(e.value)
    assert "'attn/q/kernel'" in msg and "(8, 6)" in msg and "rank=7" in msg


def test_matrix_adapter_on_vector_or_integer_leaf():
    p = _params()
    a = tree.assign(p, [tree.Rule(where="norm/scale", then=adapters.lora(2))])
    with pytest.raises(ValueError) as e:
        adapters.init(a, jax.random.key(0), p)
    assert "'norm/scale'" in str(e.value) and "(8,)" in str(e.value)
    assert "1-D" in str(e.value)
    a = tree.assign(p, [tree.Rule(where="ids/table", then=adapters.lora(2))])
    with pytest.raises(TypeError) as e:
        adapters.init(a, jax.random.key(0), p)
    assert "'ids/table'" in str(e.value) and "int32" in str(e.value)


def test_rank3_leaf_without_dimension_numbers():
    p = {"blk": {"kernel": jnp.ones((2, 3, 4, 5))}}
    with pytest.raises(ValueError, match=r"(?s)blk/kernel: shape \(2, 3, 4, 5\).*"
                       r"DimensionNumbers\(reduction_axis=\(0, 1, 2\), output_axis=3\)"):
        tree.assign(p, [tree.Rule(where="blk/kernel", then=adapters.lora(2))])
    # A hand-built assignment fails at init, naming the path too.
    with pytest.raises(ValueError, match=r"(?s)'blk/kernel'.*\(2, 3, 4, 5\).*dimension_numbers"):
        adapters.init({"blk/kernel": adapters.lora(2)}, jax.random.key(0), p)


def test_colliding_paths():
    p = {"attn/q": {"kernel": jnp.ones((4, 4))}, "attn": {"q": {"kernel": jnp.ones((4, 4))}}}
    with pytest.raises(ValueError, match="share the canonical path 'attn/q/kernel'"):
        tree.assign(p, [tree.Rule(where=".*kernel", then=adapters.lora(2))])


def test_materialize_with_state_from_another_tree():
    p = _params()
    a = tree.assign(p, [tree.Rule(where="attn/q/kernel", then=adapters.lora(2))])
    st = adapters.init(a, jax.random.key(0), p)
    other = {"attn": {"q": {"kernel": jnp.ones((5, 6))}}}
    a_other = tree.assign(other, [tree.Rule(where="attn/q/kernel",
                                            then=adapters.lora(2))])
    with pytest.raises(ValueError) as e:
        adapters.materialize(a_other, other, *st)
    msg = str(e.value)
    assert "'attn/q/kernel'" in msg and "(5, 6)" in msg and "another tree" in msg
    # A state keyed by other paths.
    a_k = tree.assign(p, [tree.Rule(where="attn/k/kernel", then=adapters.lora(2))])
    with pytest.raises(ValueError, match=r"lacks \['attn/k/kernel'\]"):
        adapters.materialize(a_k, p, *st)


def test_assignment_payload_and_path_errors():
    p = _params()
    with pytest.raises(TypeError, match="not a peftjax.adapters.Adapter"):
        adapters.init({"attn/q/kernel": "lora"}, jax.random.key(0), p)
    with pytest.raises(ValueError, match="not a leaf of params"):
        adapters.init({"attn/x": adapters.lora(2)}, jax.random.key(0), p)


def test_unfold_requires_exactness():
    p = _params()
    a = tree.assign(p, [tree.Rule(where="attn/q/kernel", then=adapters.dora(2))])
    st = adapters.init(a, jax.random.key(0), p)
    merged = adapters.fold(a, p, *st)
    with pytest.raises(TypeError, match="needs the aux"):
        adapters.unfold(a, merged, *st)
    inexact = adapters.Adapter(init=adapters.lora(2).init,
                               apply=adapters.lora(2).apply, name="custom")
    a2 = {"attn/q/kernel": inexact}
    st2 = adapters.init(a2, jax.random.key(0), p)
    with pytest.raises(TypeError, match="no exact inverse"):
        adapters.unfold(a2, adapters.fold(a2, p, *st2), *st2)


def test_ssf_requires_bias_and_bias_conflicts():
    p = {"l": {"kernel": jnp.ones((3, 2))}}
    a = tree.assign(p, [tree.Rule(where="l/kernel", then=adapters.ssf())])
    with pytest.raises(ValueError, match="no leaf 'l/bias'"):
        adapters.init(a, jax.random.key(0), p)
    p = {"l": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2, 3))}}
    a = {"l/kernel": adapters.ia3(), "l/bias": adapters.lora(1)}
    with pytest.raises(ValueError, match="both assigned"):
        adapters.init(a, jax.random.key(0), p)


def test_two_kernels_sharing_one_bias():
    p = {"w": jnp.ones((3, 2)), "v": jnp.ones((3, 2)), "bias": jnp.ones(2)}
    a = {"w": adapters.ia3(), "v": adapters.ia3()}
    with pytest.raises(ValueError, match="bias of both"):
        adapters.init(a, jax.random.key(0), p)


@pytest.mark.parametrize("make", [
    lambda d: adapters.lora(2, dropout=d),
    lambda d: adapters.dora(2, dropout=d),
    lambda d: adapters.lora_xs(2, dropout=d),
    lambda d: adapters.nola(2, 3, 3, dropout=d),
    lambda d: adapters.abba(2, 2, dropout=d),
    lambda d: adapters.sora(2, dropout=d),
], ids=["lora", "dora", "lora_xs", "nola", "abba", "sora"])
@pytest.mark.parametrize("rate", [1.0, -0.1])
def test_dropout_outside_unit_interval_is_refused_by_every_factory(make, rate):
    # checked once in lift_matrix; the message names the adapter and the rate
    with pytest.raises(ValueError, match=rf"^\w+\(.*\): dropout must be in \[0, 1\), got {rate}"):
        make(rate)
    assert make(0.5).dropout == 0.5
