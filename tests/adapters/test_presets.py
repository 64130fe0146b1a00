"""The model-agnostic ``all_linear_rules`` preset on a dict-of-arrays tree."""

import jax.numpy as jnp
import pytest

from peftjax import adapters, tree


def test_all_linear_picks_kernels_of_matrix_rank(tiny_params):
    # tiny_params: dense1/dense2 (in, out), attn/qkv (embed, heads, head_dim),
    # stack (layers, in, out), embed, biases and a norm scale.
    two = tree.assign(tiny_params, adapters.all_linear_rules("lora"))
    assert sorted(two) == ["dense1/kernel", "dense2/kernel"]
    head_out = tree.assign(tiny_params, adapters.all_linear_rules(
        "lora", exclude=[r"dense2/kernel"]))
    assert sorted(head_out) == ["dense1/kernel"]
    three = tree.assign({"stack": tiny_params["stack"]},
                        adapters.all_linear_rules("lora", ndim=3))
    assert sorted(three) == ["stack/kernel"]
    linen = {"params": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}}
    assert sorted(tree.assign(linen, adapters.all_linear_rules("x"))) == [
        "params/Dense_0/kernel"]


def test_all_linear_errors(tiny_params):
    with pytest.raises(ValueError, match="ndim must be 2"):
        adapters.all_linear_rules("lora", ndim=4)
    with pytest.raises(TypeError, match="list of path regexes"):
        adapters.all_linear_rules("lora", exclude="head/kernel")
    with pytest.raises(ValueError, match="matched no path"):
        tree.assign(tiny_params, adapters.all_linear_rules("lora", exclude=["head"]))
