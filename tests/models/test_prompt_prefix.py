"""Prompt tuning and prefix tuning consumed by the Llama model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters
from peftjax import models as pm
from tests import helpers as h
from tests.models.test_llama import make, make_config, tokens


def _apply(g, p, ids, **kw):
    return pm.apply(g, p, ids, **kw)


@pytest.mark.parametrize("scan", [False, True])
def test_zero_length_prompt_and_prefix_equal_base(scan):
    cfg = make_config()
    g, p = make(cfg, scan_layers=scan)
    ids = tokens(cfg)
    base = _apply(g, p, ids)
    empty_prompt = jnp.zeros((0, cfg.hidden_size), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(_apply(g, p, ids, prompt_embeddings=empty_prompt)), np.asarray(base))
    empty = adapters.PrefixParams(
        keys=jnp.zeros((cfg.num_hidden_layers, 0, cfg.num_key_value_heads,
                        cfg.dim_head)),
        values=jnp.zeros((cfg.num_hidden_layers, 0, cfg.num_key_value_heads,
                          cfg.dim_head)))
    np.testing.assert_array_equal(np.asarray(_apply(g, p, ids, prefix=empty)),
                                  np.asarray(base))


@pytest.mark.parametrize("scan", [False, True])
def test_prompt_of_token_embeddings_equals_prepended_tokens(scan):
    cfg = make_config()
    g, p = make(cfg, scan_layers=scan)
    ids = tokens(cfg, b=2, t=6)
    prompt_ids = [5, 9, 2]
    prompt = adapters.prompt_tuning(jax.random.key(0), 3, p["embed_tokens"]["embedding"],
                                    init=adapters.PromptInit.TEXT, token_ids=prompt_ids)
    got = _apply(g, p, ids, prompt_embeddings=prompt.embeddings)
    full = jnp.concatenate([jnp.tile(jnp.asarray(prompt_ids, ids.dtype)[None], (2, 1)),
                            ids], axis=1)
    want = _apply(g, p, full)[:, 3:]
    np.testing.assert_allclose(h.f64(got), h.f64(want), **h.MATMUL_F32)


@pytest.mark.parametrize("scan", [False, True])
def test_prefix_of_cached_keys_equals_prepended_tokens(scan):
    cfg = make_config()
    g, p = make(cfg, scan_layers=scan)
    model = pm.rebuild(g, p)
    ids = tokens(cfg, b=2, t=6)
    prefix_ids = jnp.asarray([[7, 3, 11, 4]], jnp.int32)
    cache = model.init_cache(1, 4)
    _, cache = model.decode(prefix_ids, cache)
    prefix = adapters.PrefixParams(keys=cache.k[:, 0], values=cache.v[:, 0])
    got = _apply(g, p, ids, prefix=prefix)
    full = jnp.concatenate([jnp.tile(prefix_ids, (2, 1)), ids], axis=1)
    want = _apply(g, p, full)[:, 4:]
    np.testing.assert_allclose(h.f64(got), h.f64(want), **h.MATMUL_F32)


def test_prompt_and_prefix_tuning_lower_the_loss():
    cfg = make_config()
    g, p = make(cfg)
    ids = tokens(cfg, b=4, t=8)

    def lm_loss(logits):
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], ids[:, 1:]).mean()

    prompt = adapters.prompt_tuning(jax.random.key(0), 4, p["embed_tokens"]["embedding"],
                                    init=adapters.PromptInit.SAMPLE_VOCAB)
    prefix = adapters.prefix_tuning(jax.random.key(1), 3,
                                    num_layers=cfg.num_hidden_layers,
                                    num_kv_heads=cfg.num_key_value_heads,
                                    head_dim=cfg.dim_head, hidden_size=16,
                                    projection_hidden=24)
    dims = dict(num_layers=cfg.num_hidden_layers,
                num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_head)
    cases = [
        (prompt, lambda t: _apply(g, p, ids, prompt_embeddings=t.embeddings)),
        (prefix, lambda t: _apply(g, p, ids, prefix=adapters.prefix_kv(t, **dims))),
    ]
    for trainable, forward in cases:
        opt = optax.adam(5e-2)
        state = opt.init(trainable)
        loss_grad = jax.jit(jax.value_and_grad(lambda t, f=forward: lm_loss(f(t))))
        losses = []
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
            for _ in range(6):
                value, grads = loss_grad(trainable)
                updates, state = opt.update(grads, state, trainable)
                trainable = optax.apply_updates(trainable, updates)
                losses.append(float(value))
        assert losses[-1] < losses[0]


def test_bad_shapes_and_overflow():
    cfg = make_config(max_position_embeddings=10)
    g, p = make(cfg)
    ids = tokens(cfg, b=1, t=8)
    with pytest.raises(ValueError, match="prompt_embeddings has shape"):
        _apply(g, p, ids, prompt_embeddings=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=10"):
        _apply(g, p, ids, prompt_embeddings=jnp.zeros((3, cfg.hidden_size)))
    bad = adapters.PrefixParams(keys=jnp.zeros((1, 2, 1, 1)), values=jnp.zeros((1, 2, 1, 1)))
    with pytest.raises(ValueError, match=r"expected \(L, P, KV, D\)"):
        _apply(g, p, ids, prefix=bad)
