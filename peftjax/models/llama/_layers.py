# SPDX-License-Identifier: Apache-2.0
"""The Llama decoder layer and its parts (RMSNorm, attention, SwiGLU MLP).

Each projection inside a layer goes through ``_hooks.proj``, which calls the
model hook (``peftjax.models.Hooks``) when one is set.

Exports: nothing public (``_model.LlamaForCausalLM`` uses them).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import _hooks
from peftjax.models.llama import _config, _rope

_INIT_STD = 0.02


def _linear(
    d_in: int, d_out: int, *, bias: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(_INIT_STD),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax attention with GQA grouping; softmax in float32.

    q: (B, T, H, D); k, v: (B, S, KV, D); allowed: (B, T, S) bool.
    Returns (B, T, H, D) in q's dtype.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32
    ) * (d**-0.5)
    mask = allowed[:, None, None, :, :]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


class RMSNorm(nnx.Module):
    """RMSNorm in float32 (as HF Llama): ``x / rms(x) * scale``; parameter ``scale``."""

    def __init__(
        self, dim: int, *, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
    ):
        del rngs
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        out_dtype = x.dtype if self.dtype is None else self.dtype
        scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (y * scale).astype(out_dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE (``q/k/v/o_proj``)."""

    def __init__(
        self, cfg: _config.LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
    ):
        d, h, kv, hd = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.dim_head,
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.q_proj = _linear(d, h * hd, bias=cfg.attention_bias, **kw)
        self.k_proj = _linear(d, kv * hd, bias=cfg.attention_bias, **kw)
        self.v_proj = _linear(d, kv * hd, bias=cfg.attention_bias, **kw)
        self.o_proj = _linear(h * hd, d, bias=False, **kw)

    def __call__(self, x, cos, sin, allowed, kv_cache, index, ctx=None):
        b, t, _ = x.shape
        q = _hooks.proj(self.q_proj, x, ctx, "self_attn/q_proj")
        k = _hooks.proj(self.k_proj, x, ctx, "self_attn/k_proj")
        v = _hooks.proj(self.v_proj, x, ctx, "self_attn/v_proj")
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = _rope.apply_rope(q, cos, sin), _rope.apply_rope(k, cos, sin)
        new_cache = None
        if kv_cache is not None:
            ck, cv = kv_cache
            zero = jnp.zeros((), jnp.int32)
            ck = jax.lax.dynamic_update_slice(
                ck, k.astype(ck.dtype), (zero, index, zero, zero)
            )
            cv = jax.lax.dynamic_update_slice(
                cv, v.astype(cv.dtype), (zero, index, zero, zero)
            )
            k, v, new_cache = ck.astype(q.dtype), cv.astype(q.dtype), (ck, cv)
        out = _attend(q, k, v, allowed)
        out = _hooks.add_attention(ctx, "self_attn", q, self, out)
        out = out.reshape(b, t, self.num_heads * self.head_dim)
        return _hooks.proj(self.o_proj, out, ctx, "self_attn/o_proj"), new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(
        self, cfg: _config.LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
    ):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x, ctx=None):
        g = _hooks.proj(self.gate_proj, x, ctx, "mlp/gate_proj")
        u = _hooks.proj(self.up_proj, x, ctx, "mlp/up_proj")
        return _hooks.proj(self.down_proj, jax.nn.silu(g) * u, ctx, "mlp/down_proj")


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: RMSNorm, attention, residual, RMSNorm, MLP, residual."""

    def __init__(
        self, cfg: _config.LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, **kw
        )
        self.mlp = MLP(cfg, **kw)

    def __call__(self, h, cos, sin, allowed, kv_cache, index, ctx=None):
        a, new_cache = self.self_attn(
            self.input_layernorm(h), cos, sin, allowed, kv_cache, index, ctx
        )
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h), ctx)
        return h, new_cache


def _stacked_layer(cfg, n, key, **kw) -> DecoderLayer:
    """One ``DecoderLayer`` whose parameters have a leading axis of size ``n``."""
    gdef = nnx.graphdef(
        nnx.eval_shape(lambda: DecoderLayer(cfg, rngs=nnx.Rngs(0), **kw))
    )
    keys = jax.random.split(key, n)
    state = jax.vmap(
        lambda k: nnx.state(DecoderLayer(cfg, rngs=nnx.Rngs(params=k), **kw))
    )(keys)
    return nnx.merge(gdef, state)
