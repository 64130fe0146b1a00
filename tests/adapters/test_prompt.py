"""Soft prompt and prefix parameters (the pure part; models consume them)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h


def _table():
    return jnp.asarray(np.random.default_rng(0).standard_normal((20, 6)), jnp.float32)


def test_prompt_inits():
    table = _table()
    p = adapters.prompt_tuning(jax.random.key(0), 5, table,
                               init=adapters.PromptInit.TEXT, token_ids=[3, 7])
    np.testing.assert_array_equal(np.asarray(p.embeddings),
                                  np.asarray(table)[[3, 7, 3, 7, 3]])
    s = adapters.prompt_tuning(jax.random.key(1), 8, table,
                               init=adapters.PromptInit.SAMPLE_VOCAB)
    rows = {tuple(np.asarray(r)) for r in np.asarray(table)}
    assert all(tuple(r) in rows for r in np.asarray(s.embeddings))
    r = adapters.prompt_tuning(jax.random.key(2), 400, table)
    assert abs(h.f64(r.embeddings).std() - 1.0) < 0.05  # N(0, 1), 2400 draws
    with pytest.raises(ValueError, match="outside the vocabulary"):
        adapters.prompt_tuning(jax.random.key(0), 2, table,
                               init=adapters.PromptInit.TEXT, token_ids=[25])
    with pytest.raises(ValueError, match="needs token_ids"):
        adapters.prompt_tuning(jax.random.key(0), 2, table,
                               init=adapters.PromptInit.TEXT)
    with pytest.raises(ValueError, match="num_tokens"):
        adapters.prompt_tuning(jax.random.key(0), 0, table)


def test_prefix_direct_and_projection_formula():
    d = adapters.prefix_tuning(jax.random.key(0), 3, num_layers=2, num_kv_heads=2,
                               head_dim=4)
    assert d.keys.shape == d.values.shape == (2, 3, 2, 4)
    kv = adapters.prefix_kv(d, num_layers=2, num_kv_heads=2, head_dim=4)
    assert kv is d
    p = adapters.prefix_tuning(jax.random.key(1), 3, num_layers=2, num_kv_heads=2,
                               head_dim=4, hidden_size=5, projection_hidden=7)
    p = p._replace(b1=p.b1 + 0.1, b2=p.b2 - 0.2)
    got = adapters.prefix_kv(p, num_layers=2, num_kv_heads=2, head_dim=4)
    hdn = np.tanh(h.f64(p.embedding) @ h.f64(p.w1) + h.f64(p.b1))
    flat = hdn @ h.f64(p.w2) + h.f64(p.b2)  # (P, L*2*KV*D), PEFT's layout
    ref = flat.reshape(3, 2, 2, 2, 4).transpose(1, 2, 0, 3, 4)
    np.testing.assert_allclose(h.f64(got.keys), ref[:, 0], **h.MATMUL_F32)
    np.testing.assert_allclose(h.f64(got.values), ref[:, 1], **h.MATMUL_F32)
    with pytest.raises(ValueError, match="hidden_size"):
        adapters.prefix_tuning(jax.random.key(0), 3, num_layers=2, num_kv_heads=1,
                               head_dim=4, projection_hidden=8)
