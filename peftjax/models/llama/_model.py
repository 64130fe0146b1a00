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

from peftjax.models import _hooks
from peftjax.models.llama import _config, _layers, _rope
from peftjax.models.llama._layers import DecoderLayer, RMSNorm, _linear, _stacked_layer

_INIT_STD = _layers._INIT_STD


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
    def _layer_fn(self, gdef, hooks, slots):
        # The hook object is closed over (it need not be a pytree); the layer
        # index is an argument so that a scanned stack passes it traced.
        def fn(state, h, cos, sin, allowed, kv, index, layer):
            ctx = None if hooks is None else (hooks, layer, slots)
            return nnx.merge(gdef, state)(h, cos, sin, allowed, kv, index, ctx)

        return jax.checkpoint(fn) if self.remat else fn

    def _run_layers(self, h, cos, sin, allowed, kv, index, hooks=None, slots=None):
        if self.scan_layers:
            gdef, state = nnx.split(self.layers)
            fn = self._layer_fn(gdef, hooks, slots)

            def body(h, xs):
                st, kv_l, layer = xs
                return fn(st, h, cos, sin, allowed, kv_l, index, layer)

            layers = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)
            return jax.lax.scan(body, h, (state, kv, layers))
        news = []
        for i, layer in enumerate(self.layers):
            gdef, state = nnx.split(layer)
            kv_l = None if kv is None else (kv[0][i], kv[1][i])
            h, new = self._layer_fn(gdef, hooks, slots)(
                state, h, cos, sin, allowed, kv_l, index, jnp.asarray(i, jnp.int32)
            )
            news.append(new)
        if kv is None:
            return h, None
        return h, (jnp.stack([n[0] for n in news]), jnp.stack([n[1] for n in news]))

    def _head(self, h, return_hidden=False):
        h = self.norm(h)
        if self.config.tie_word_embeddings:
            emb = self.embed_tokens.embedding[...]
            logits = jnp.einsum("btd,vd->btv", h, emb.astype(h.dtype))
        else:
            logits = self.lm_head(h)
        logits = logits.astype(jnp.float32)
        return (logits, h) if return_hidden else logits

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
        hooks: Any = None,
        return_hidden: bool = False,
        keep_prompt_logits: bool = False,
    ) -> Any:
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
          hooks: a ``peftjax.models.Hooks`` (per-token computation inside the
            layers: aLoRA, routed LoRA mixtures, LLaMA-Adapter); its ``Site``
            slots count prompt and prefix positions.
          return_hidden: also return the final-normed hidden states
            ``(B, T, d)`` (what a classifier over tokens reads, e.g. X-LoRA's).
          keep_prompt_logits: with ``prompt_embeddings``, return the logits of
            the ``P`` prompt positions too, ``(B, P + T, V)`` (CPT's loss
            counts label tokens inside its prompt).

        Returns:
          The logits (and, with ``return_hidden``, ``(logits, hidden)``); rows
          at padding positions are meaningless.
        """
        hooks = _hooks.check(hooks, "LlamaForCausalLM")
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
            return self._call_soft(
                tokens, attention_mask, prompt_embeddings, prefix, hooks, return_hidden,
                keep_prompt_logits,
            )
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
        h, _ = self._run_layers(
            h, cos, sin, allowed, None, jnp.zeros((), jnp.int32), hooks, slots
        )
        return self._head(h, return_hidden)

    def _call_soft(self, tokens, attention_mask, prompt, prefix, hooks, return_hidden,
                   keep_prompt_logits=False):
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
            h, _ = self._run_layers(
                h, cos, sin, allowed, None, jnp.zeros((), jnp.int32), hooks, slots
            )
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
                h, cos, sin, allowed, (cache_of(keys), cache_of(values)), index,
                hooks, q_slots,
            )
        cut = 0 if keep_prompt_logits else n_prompt
        if return_hidden:
            logits, hidden = self._head(h, True)
            return logits[:, cut:], hidden[:, cut:]
        return self._head(h)[:, cut:]

    def init_cache(
        self,
        batch_size: int,
        cache_len: int,
        *,
        dtype: Any = jnp.float32,
        prefix: Any = None,
    ) -> KVCache:
        """Returns an empty :class:`KVCache` of static length ``cache_len``.

        Args:
          batch_size: B.
          cache_len: S, the maximum number of tokens (prefix + prompt +
            generated).
          dtype: storage dtype of keys and values.
          prefix: optional prefix keys/values (as for ``__call__``): they fill
            slots ``[0, P)``, and the next token takes position ``P``, so
            decoding equals ``__call__(..., prefix=prefix)``.

        Returns:
          The cache (``index = P``, 0 without a prefix).
        """
        cfg = self.config
        shape = (
            cfg.num_hidden_layers,
            batch_size,
            cache_len,
            cfg.num_key_value_heads,
            cfg.dim_head,
        )
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        valid = jnp.zeros((batch_size, cache_len), jnp.bool_)
        n = 0 if prefix is None else prefix.keys.shape[1]
        if n:
            want = (cfg.num_hidden_layers, n, cfg.num_key_value_heads, cfg.dim_head)
            if prefix.keys.shape != want or prefix.values.shape != want:
                raise ValueError(
                    f"init_cache: prefix keys/values have shapes "
                    f"{prefix.keys.shape}/{prefix.values.shape}; expected "
                    f"(L, P, KV, D) = {want}"
                )
            if n > cache_len:
                raise ValueError(
                    f"init_cache: prefix length {n} exceeds cache_len={cache_len}"
                )

            def fill(c, x):
                x = x.astype(dtype)[:, None]
                x = jnp.broadcast_to(x, (x.shape[0], batch_size) + x.shape[2:])
                return c.at[:, :, :n].set(x)

            k, v = fill(k, prefix.keys), fill(v, prefix.values)
            valid = valid.at[:, :n].set(True)
        return KVCache(
            k,
            v,
            valid,
            jnp.asarray(n, jnp.int32),
            jnp.full((batch_size,), n, jnp.int32),
        )

    def decode(
        self,
        tokens: jax.Array,
        cache: KVCache,
        *,
        attention_mask: jax.Array | None = None,
        prompt_embeddings: jax.Array | None = None,
        hooks: Any = None,
        return_hidden: bool = False,
    ) -> tuple[Any, KVCache]:
        """Runs ``tokens`` ``(B, T)`` after the cached ones; returns logits and cache.

        Used for the prompt (prefill, ``T`` = prompt length, left-padded with
        ``attention_mask``) and for each generated token (``T = 1``). Writes
        slots ``[index, index + T)`` (``+ P`` with a soft prompt); the caller
        keeps them ``<= S``.

        Args:
          tokens: int ids ``(B, T)``.
          cache: from :meth:`init_cache` or a previous call.
          attention_mask: ``(B, T)`` nonzero for real tokens (default all real).
          prompt_embeddings: a soft prompt ``(P, d)`` or ``(B, P, d)`` placed
            before ``tokens`` (the prefill call of prompt tuning); its logits
            are dropped.
          hooks: a ``peftjax.models.Hooks``; its ``Site.slots`` are cache slots.
          return_hidden: also return the final-normed hidden states.

        Returns:
          ``(logits (B, T, V) float32, updated cache)``; with ``return_hidden``
          ``((logits, hidden), cache)``.
        """
        hooks = _hooks.check(hooks, "LlamaForCausalLM.decode")
        b, t = tokens.shape
        s = cache.k.shape[2]
        mask = (
            jnp.ones((b, t), jnp.bool_)
            if attention_mask is None
            else attention_mask.astype(jnp.bool_)
        )
        h = self.embed_tokens(tokens)
        n_prompt = 0
        if prompt_embeddings is not None and prompt_embeddings.shape[-2] > 0:
            prompt = prompt_embeddings
            if prompt.ndim == 2:
                prompt = jnp.broadcast_to(prompt[None], (b,) + prompt.shape)
            if prompt.ndim != 3 or prompt.shape[0] != b or prompt.shape[2] != h.shape[2]:
                raise ValueError(
                    f"decode: prompt_embeddings has shape {prompt.shape}; expected "
                    f"(P, {h.shape[2]}) or ({b}, P, {h.shape[2]})"
                )
            n_prompt = prompt.shape[1]
            h = jnp.concatenate([prompt.astype(h.dtype), h], axis=1)
            mask = jnp.concatenate([jnp.ones((b, n_prompt), jnp.bool_), mask], axis=1)
        total = n_prompt + t
        counts = jnp.cumsum(mask.astype(jnp.int32), axis=1)
        positions = cache.next_position[:, None] + jnp.maximum(counts - 1, 0)
        valid = jax.lax.dynamic_update_slice(
            cache.valid, mask, (jnp.zeros((), jnp.int32), cache.index)
        )
        q_slots = cache.index + jnp.arange(total, dtype=jnp.int32)
        allowed = self._allowed(q_slots, valid, jnp.arange(s, dtype=jnp.int32))
        cos, sin = _rope.rope_angles(positions, _rope.inv_frequencies(self.config))
        h, (k, v) = self._run_layers(
            h, cos, sin, allowed, (cache.k, cache.v), cache.index, hooks, q_slots
        )
        new = KVCache(
            k, v, valid, cache.index + total, cache.next_position + counts[:, -1]
        )
        if return_hidden:
            logits, hidden = self._head(h, True)
            return (logits[:, n_prompt:], hidden[:, n_prompt:]), new
        return self._head(h)[:, n_prompt:], new
