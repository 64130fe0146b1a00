"""llama.tiny_config: the canonical tiny size, overrides, and errors."""

import math

import jax
import pytest
from flax import nnx

from peftjax import models as pm
from peftjax.models import llama


def _num_params(cfg):
    _, shapes = pm.split_params(nnx.eval_shape(
        lambda: llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_canonical_size_and_parameter_count():
    c = llama.tiny_config()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
            c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        256, 64, 128, 2, 4, 2, 16)
    assert c.tie_word_embeddings and (c.rope_theta, c.rms_norm_eps) == (10000.0, 1e-5)
    # embedding 256*64; per layer q,o 64*64, k,v 64*32, SwiGLU 3*64*128, two norms
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert _num_params(c) == 256 * 64 + 2 * per_layer + 64 == 90_432


def test_overrides_replace_only_the_fields_named():
    c = llama.tiny_config(num_hidden_layers=4, rope_theta=1e5, tie_word_embeddings=False)
    assert c == llama.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5)
    assert _num_params(c) == 256 * 64 * 2 + 4 * (2 * 64 * 64 + 2 * 64 * 32
                                                 + 3 * 64 * 128 + 2 * 64) + 64


def test_unknown_or_invalid_overrides_are_errors():
    with pytest.raises(TypeError, match=r"\['num_layers'\] are not LlamaConfig fields"):
        llama.tiny_config(num_layers=3)
    with pytest.raises(ValueError, match="num_key_value_heads=3 must divide"):
        llama.tiny_config(num_key_value_heads=3)
