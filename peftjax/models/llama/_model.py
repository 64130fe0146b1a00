# SPDX-License-Identifier: Apache-2.0
"""Flax NNX Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2).

"LLaMA: Open and Efficient Foundation Language Models", Touvron et al., 2023,
https://arxiv.org/abs/2302.13971; grouped-query attention from "GQA", Ainslie
et al., 2023, https://arxiv.org/abs/2305.13245.

Layers are either an ``nnx.List`` of decoder layers (unrolled; parameter paths
``layers/{i}/...``) or a single decoder layer whose parameters carry a leading
layer axis (scanned; paths ``layers/...``), run with ``jax.lax.scan``. Both
layouts hold the same sub-paths, so ``peftjax.tree.stack_layers`` /
``unstack_layers`` convert their parameter dicts exactly. ``remat=True`` wraps
each layer in ``jax.checkpoint``. Kernels use Flax layout ``(in, out)``.

Packed sequences: ``segment_ids`` (``peftjax.data.pack``) keep attention
inside each document of a block, and RoPE positions restart at each
document, so a packed block gives every document the logits it would get
alone.

Exports: ``LlamaForCausalLM``, ``KVCache``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.llama import _config, _rope

_INIT_STD = 0.02


class KVCache(NamedTuple):
    """Key/value cache for incremental decoding with a static length ``S``.

    Attributes:
      k: cached keys ``(L, B, S, KV, D)``.
      v: cached values ``(L, B, S, KV, D)``.
      valid: ``(B, S)`` bool, the slot holds a real (non-padding) token.
      index: ``()`` int32, the number of slots written so far.
      next_position: ``(B,)`` int32, the RoPE position of each row's next token.

    Example:
      >>> from flax import nnx
      >>> from peftjax.models.llama import _config
      >>> cfg = _config.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
      ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
      >>> LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)).init_cache(3, 16).k.shape
      (2, 3, 16, 1, 4)
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array
    next_position: jax.Array


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


def _check_segment_ids(segment_ids: Any, shape: tuple[int, ...]) -> jax.Array:
    """``segment_ids`` as int32 after checking it is integer and ``shape``."""
    dtype = getattr(segment_ids, "dtype", None)
    if (
        tuple(getattr(segment_ids, "shape", ())) != tuple(shape)
        or dtype is None
        or not jnp.issubdtype(dtype, jnp.integer)
    ):
        raise ValueError(
            f"segment_ids has shape {tuple(getattr(segment_ids, 'shape', ()))} and "
            f"dtype {dtype}; expected integer ids of the tokens' shape {tuple(shape)}"
        )
    return jnp.asarray(segment_ids).astype(jnp.int32)


def _segment_positions(segment_ids: jax.Array) -> jax.Array:
    """RoPE positions that restart at 0 where each segment starts.

    Args:
      segment_ids: int ``(B, T)``; a segment starts at index 0 and wherever
        the id changes (padding, id 0, gets positions too: they are unused).

    Returns:
      int32 ``(B, T)``: the index within the segment.

    Example:
      >>> import jax.numpy as jnp
      >>> _segment_positions(jnp.array([[1, 1, 1, 2, 2, 0]])).tolist()
      [[0, 1, 2, 0, 1, 0]]
    """
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    first = jnp.concatenate(
        [
            jnp.ones(segment_ids.shape[:1] + (1,), jnp.bool_),
            segment_ids[:, 1:] != segment_ids[:, :-1],
        ],
        axis=1,
    )
    start = jax.lax.cummax(jnp.where(first, idx, 0), axis=1)
    return idx - start


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

    def __call__(self, x, cos, sin, allowed, kv_cache, index):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
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
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(
        self, cfg: _config.LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
    ):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def __call__(self, h, cos, sin, allowed, kv_cache, index):
        a, new_cache = self.self_attn(
            self.input_layernorm(h), cos, sin, allowed, kv_cache, index
        )
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
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


class LlamaForCausalLM(nnx.Module):
    """Llama-family causal language model.

    Parameter paths (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``), unrolled
    (``scan_layers=False``) with ``{i}`` the layer, scanned without it and with a
    leading ``(L, ...)`` axis on every layer leaf::

      embed_tokens/embedding                         (V, d)
      layers/{i}/input_layernorm/scale               (d,)
      layers/{i}/self_attn/q_proj/kernel             (d, H*D)   (+ bias (H*D,) Qwen2)
      layers/{i}/self_attn/k_proj/kernel             (d, KV*D)  (+ bias Qwen2)
      layers/{i}/self_attn/v_proj/kernel             (d, KV*D)  (+ bias Qwen2)
      layers/{i}/self_attn/o_proj/kernel             (H*D, d)
      layers/{i}/post_attention_layernorm/scale      (d,)
      layers/{i}/mlp/gate_proj/kernel                (d, F)
      layers/{i}/mlp/up_proj/kernel                  (d, F)
      layers/{i}/mlp/down_proj/kernel                (F, d)
      norm/scale                                     (d,)
      lm_head/kernel                                 (d, V)  only if untied

    Args:
      cfg: the config.
      scan_layers: keyword-only; stacked layers run with ``jax.lax.scan``.
      remat: keyword-only; recompute each layer's activations in the backward
        pass (``jax.checkpoint``).
      dtype: compute dtype (``None``: the parameter dtype).
      param_dtype: parameter storage dtype.
      rngs: initialisation RNGs (weights ~ N(0, 0.02), norms = 1).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> cfg = _config.LlamaConfig(vocab_size=16, hidden_size=8,
      ...     intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
      ...     num_key_value_heads=1)
      >>> m = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
      >>> m(jnp.zeros((1, 3), jnp.int32)).shape
      (1, 3, 16)
    """

    def __init__(
        self,
        cfg: _config.LlamaConfig,
        *,
        scan_layers: bool = False,
        remat: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = cfg
        self.scan_layers = scan_layers
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nnx.initializers.normal(_INIT_STD),
            rngs=rngs,
            **kw,
        )
        if scan_layers:
            self.layers = _stacked_layer(
                cfg, cfg.num_hidden_layers, rngs.params(), **kw
            )
        else:
            self.layers = nnx.List(
                [
                    DecoderLayer(cfg, rngs=rngs, **kw)
                    for _ in range(cfg.num_hidden_layers)
                ]
            )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(
                cfg.hidden_size, cfg.vocab_size, bias=False, rngs=rngs, **kw
            )

    # -- internals --------------------------------------------------------------
    def _layer_fn(self, gdef):
        def fn(state, h, cos, sin, allowed, kv, index):
            return nnx.merge(gdef, state)(h, cos, sin, allowed, kv, index)

        return jax.checkpoint(fn) if self.remat else fn

    def _run_layers(self, h, cos, sin, allowed, kv, index):
        if self.scan_layers:
            gdef, state = nnx.split(self.layers)
            fn = self._layer_fn(gdef)

            def body(h, xs):
                st, kv_l = xs
                return fn(st, h, cos, sin, allowed, kv_l, index)

            return jax.lax.scan(body, h, (state, kv))
        news = []
        for i, layer in enumerate(self.layers):
            gdef, state = nnx.split(layer)
            kv_l = None if kv is None else (kv[0][i], kv[1][i])
            h, new = self._layer_fn(gdef)(state, h, cos, sin, allowed, kv_l, index)
            news.append(new)
        if kv is None:
            return h, None
        return h, (jnp.stack([n[0] for n in news]), jnp.stack([n[1] for n in news]))

    def _head(self, h):
        h = self.norm(h)
        if self.config.tie_word_embeddings:
            emb = self.embed_tokens.embedding[...]
            logits = jnp.einsum("btd,vd->btv", h, emb.astype(h.dtype))
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def _allowed(self, q_slots, k_valid, k_slots, segment_ids=None):
        """(B, T, S) bool: causal (by slot), key validity, same segment (when
        ``segment_ids`` ``(B, T)`` is given, queries and keys are the same
        tokens) and sliding window."""
        allowed = (k_slots[None, None, :] <= q_slots[None, :, None]) & k_valid[
            :, None, :
        ]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
        window = self.config.sliding_window
        if window is not None:
            allowed = allowed & (
                q_slots[None, :, None] - k_slots[None, None, :] < window
            )
        return allowed

    # -- public ---------------------------------------------------------------
    def __call__(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        prompt_embeddings: jax.Array | None = None,
        prefix: Any = None,
    ) -> jax.Array:
        """Returns float32 logits ``(B, T, V)`` for int tokens ``(B, T)``.

        Args:
          tokens: int token ids ``(B, T)``.
          attention_mask: ``(B, T)``, nonzero for real tokens, zero for padding
            (left or right). Padding keys are never attended to.
          positions: RoPE positions ``(B, T)``; default ``cumsum(mask) - 1``
            (``arange(T)`` without a mask), so left padding is handled; with
            ``segment_ids`` the default restarts at 0 where a segment starts.
          segment_ids: int ``(B, T)`` document ids of packed blocks
            (``peftjax.data.pack``): a token attends only to earlier tokens
            with the same id, so documents packed into one block never see
            each other. 0 marks padding; without ``attention_mask`` the mask
            is ``segment_ids != 0``.
          prompt_embeddings: soft prompt ``(P, d)`` or ``(B, P, d)`` prepended to
            the token embeddings (prompt tuning,
            ``peftjax.adapters.prompt_tuning``); the prompt takes positions
            ``0..P-1`` and the logits of the prompt positions are dropped.
          prefix: per-layer prefix keys/values (prefix tuning / P-tuning v2,
            ``peftjax.adapters.prefix_tuning``): any object with ``keys`` and
            ``values`` of shape ``(L, P, KV, D)``. As in PEFT's past-key-values
            convention they are used as given (no RoPE is applied to them) and
            the real tokens' positions start at ``P``.

        Returns:
          The logits; rows at padding positions are meaningless.
        """
        # Zero-length prompts/prefixes are the base model, bit for bit.
        if prompt_embeddings is not None and prompt_embeddings.shape[-2] == 0:
            prompt_embeddings = None
        if prefix is not None and prefix.keys.shape[1] == 0:
            prefix = None
        if prompt_embeddings is not None or prefix is not None:
            if positions is not None or segment_ids is not None:
                raise ValueError(
                    "positions and segment_ids cannot be combined with "
                    "prompt_embeddings or prefix"
                )
            return self._call_soft(tokens, attention_mask, prompt_embeddings, prefix)
        b, t = tokens.shape
        if segment_ids is not None:
            segment_ids = _check_segment_ids(segment_ids, tokens.shape)
        if attention_mask is not None:
            mask = attention_mask.astype(jnp.bool_)
        elif segment_ids is not None:
            mask = segment_ids != 0
        else:
            mask = jnp.ones((b, t), jnp.bool_)
        if positions is None:
            if segment_ids is None:
                counts = jnp.cumsum(mask.astype(jnp.int32), axis=1)
                positions = jnp.maximum(counts - 1, 0)
            else:
                positions = _segment_positions(segment_ids)
        slots = jnp.arange(t, dtype=jnp.int32)
        allowed = self._allowed(slots, mask, slots, segment_ids)
        cos, sin = _rope.rope_angles(positions, _rope.inv_frequencies(self.config))
        h = self.embed_tokens(tokens)
        h, _ = self._run_layers(h, cos, sin, allowed, None, jnp.zeros((), jnp.int32))
        return self._head(h)

    def _call_soft(self, tokens, attention_mask, prompt, prefix):
        """Forward pass with a soft prompt and/or prefix keys/values."""
        b, t = tokens.shape
        mask = (
            jnp.ones((b, t), jnp.bool_)
            if attention_mask is None
            else attention_mask.astype(jnp.bool_)
        )
        h = self.embed_tokens(tokens)
        n_prompt = 0
        if prompt is not None:
            if prompt.ndim == 2:
                prompt = jnp.broadcast_to(prompt[None], (b,) + prompt.shape)
            if prompt.ndim != 3 or prompt.shape[0] != b or prompt.shape[2] != h.shape[2]:
                raise ValueError(
                    f"prompt_embeddings has shape {prompt.shape}; expected "
                    f"(P, {h.shape[2]}) or ({b}, P, {h.shape[2]})"
                )
            n_prompt = prompt.shape[1]
            h = jnp.concatenate([prompt.astype(h.dtype), h], axis=1)
            mask = jnp.concatenate([jnp.ones((b, n_prompt), jnp.bool_), mask], axis=1)
        total = h.shape[1]
        cfg = self.config
        n_prefix = 0
        if prefix is not None:
            keys, values = prefix.keys, prefix.values
            want = (
                cfg.num_hidden_layers,
                keys.shape[1],
                cfg.num_key_value_heads,
                cfg.dim_head,
            )
            if keys.shape != want or values.shape != want:
                raise ValueError(
                    f"prefix keys/values have shapes {keys.shape}/{values.shape}; "
                    f"expected (L, P, KV, D) = {want}"
                )
            n_prefix = keys.shape[1]
        s = n_prefix + total
        if s > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt/prefix length {n_prompt + n_prefix} plus {t} tokens "
                f"exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        counts = jnp.cumsum(mask.astype(jnp.int32), axis=1)
        positions = n_prefix + jnp.maximum(counts - 1, 0)
        cos, sin = _rope.rope_angles(positions, _rope.inv_frequencies(cfg))
        if prefix is None:
            slots = jnp.arange(total, dtype=jnp.int32)
            allowed = self._allowed(slots, mask, slots)
            h, _ = self._run_layers(h, cos, sin, allowed, None, jnp.zeros((), jnp.int32))
        else:
            dt = h.dtype

            def cache_of(x):
                x = jnp.broadcast_to(x.astype(dt)[:, None], (x.shape[0], b) + x.shape[1:])
                pad = jnp.zeros(x.shape[:2] + (total,) + x.shape[3:], dt)
                return jnp.concatenate([x, pad], axis=2)

            valid = jnp.concatenate([jnp.ones((b, n_prefix), jnp.bool_), mask], axis=1)
            q_slots = n_prefix + jnp.arange(total, dtype=jnp.int32)
            allowed = self._allowed(q_slots, valid, jnp.arange(s, dtype=jnp.int32))
            index = jnp.asarray(n_prefix, jnp.int32)
            h, _ = self._run_layers(
                h, cos, sin, allowed, (cache_of(keys), cache_of(values)), index
            )
        return self._head(h)[:, n_prompt:]

    def init_cache(
        self, batch_size: int, cache_len: int, *, dtype: Any = jnp.float32
    ) -> KVCache:
        """Returns an empty :class:`KVCache` of static length ``cache_len``.

        Args:
          batch_size: B.
          cache_len: S, the maximum number of tokens (prompt + generated).
          dtype: storage dtype of keys and values.

        Returns:
          The cache (all slots invalid, ``index = 0``).
        """
        cfg = self.config
        shape = (
            cfg.num_hidden_layers,
            batch_size,
            cache_len,
            cfg.num_key_value_heads,
            cfg.dim_head,
        )
        return KVCache(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((batch_size, cache_len), jnp.bool_),
            jnp.zeros((), jnp.int32),
            jnp.zeros((batch_size,), jnp.int32),
        )

    def decode(
        self,
        tokens: jax.Array,
        cache: KVCache,
        *,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Runs ``tokens`` ``(B, T)`` after the cached ones; returns logits and cache.

        Used for the prompt (prefill, ``T`` = prompt length, left-padded with
        ``attention_mask``) and for each generated token (``T = 1``). Writes
        slots ``[index, index + T)``; the caller keeps ``index + T <= S``.

        Args:
          tokens: int ids ``(B, T)``.
          cache: from :meth:`init_cache` or a previous call.
          attention_mask: ``(B, T)`` nonzero for real tokens (default all real).

        Returns:
          ``(logits (B, T, V) float32, updated cache)``.
        """
        b, t = tokens.shape
        s = cache.k.shape[2]
        mask = (
            jnp.ones((b, t), jnp.bool_)
            if attention_mask is None
            else attention_mask.astype(jnp.bool_)
        )
        counts = jnp.cumsum(mask.astype(jnp.int32), axis=1)
        positions = cache.next_position[:, None] + jnp.maximum(counts - 1, 0)
        valid = jax.lax.dynamic_update_slice(
            cache.valid, mask, (jnp.zeros((), jnp.int32), cache.index)
        )
        q_slots = cache.index + jnp.arange(t, dtype=jnp.int32)
        allowed = self._allowed(q_slots, valid, jnp.arange(s, dtype=jnp.int32))
        cos, sin = _rope.rope_angles(positions, _rope.inv_frequencies(self.config))
        h = self.embed_tokens(tokens)
        h, (k, v) = self._run_layers(
            h, cos, sin, allowed, (cache.k, cache.v), cache.index
        )
        new = KVCache(k, v, valid, cache.index + t, cache.next_position + counts[:, -1])
        return self._head(h), new
