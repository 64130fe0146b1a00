# SPDX-License-Identifier: Apache-2.0
"""Flax NNX BERT-family encoder (BERT, MiniLM, RoBERTa) with pooling and a head.

"BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", Devlin et al., 2018, https://arxiv.org/abs/1810.04805;
RoBERTa's position offsets from Liu et al., 2019,
https://arxiv.org/abs/1907.11692. Post-norm layers, learned absolute
positions, no dropout (deterministic; add regularisation in the training step
if wanted). Kernels use Flax layout ``(in, out)``.

Parameter paths (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``)::

  embeddings/word_embeddings/embedding           (V, d)
  embeddings/position_embeddings/embedding       (P, d)
  embeddings/token_type_embeddings/embedding     (types, d)
  embeddings/layer_norm/{scale,bias}             (d,)
  layers/{i}/attention/{query,key,value}/{kernel,bias}   (d, d), (d,)
  layers/{i}/attention/output/{kernel,bias}      (d, d), (d,)
  layers/{i}/attention_norm/{scale,bias}         (d,)
  layers/{i}/intermediate/{kernel,bias}          (d, F), (F,)
  layers/{i}/output/{kernel,bias}                (F, d), (d,)
  layers/{i}/output_norm/{scale,bias}            (d,)
  classifier/{kernel,bias}                       (d, labels), (labels,)  head only

Exports: ``BertModel``, ``BertForSequenceClassification``, ``mean_pool``.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import _hooks
from peftjax.models.bert import _config

_INIT_STD = 0.02


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Averages ``hidden`` ``(B, T, d)`` over the non-padding tokens.

    Args:
      hidden: token states.
      attention_mask: ``(B, T)`` nonzero for real tokens (default all).

    Returns:
      ``(B, d)`` float32, sentence-transformers' mean pooling.

    Example:
      >>> import jax.numpy as jnp
      >>> mean_pool(jnp.ones((1, 3, 2)), jnp.array([[1, 1, 0]])).tolist()
      [[1.0, 1.0]]
    """
    h = hidden.astype(jnp.float32)
    if attention_mask is None:
        return h.mean(axis=1)
    w = attention_mask.astype(jnp.float32)[:, :, None]
    return (h * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1e-9)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32; parameters ``scale`` and ``bias``."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mu = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mu).mean(axis=-1, keepdims=True)
        shape = (1,) * (x.ndim - 1) + (-1,)
        y = (x32 - mu) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32).reshape(shape)
        return (y + self.bias[...].astype(jnp.float32).reshape(shape)).astype(x.dtype)


def _linear(d_in, d_out, *, dtype, param_dtype, rngs):
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(_INIT_STD),
        rngs=rngs,
    )


def _embed(n, d, *, dtype, param_dtype, rngs):
    return nnx.Embed(
        n,
        d,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(_INIT_STD),
        rngs=rngs,
    )


def _activation(name: str):
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    return jax.nn.relu


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, cfg: _config.BertConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.word_embeddings = _embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embeddings = _embed(
            cfg.max_position_embeddings, cfg.hidden_size, **kw
        )
        self.token_type_embeddings = _embed(cfg.type_vocab_size, cfg.hidden_size, **kw)
        self.layer_norm = LayerNorm(
            cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype
        )

    def __call__(self, tokens, positions, token_types):
        h = (
            self.word_embeddings(tokens)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_types)
        )
        return self.layer_norm(h)


class Attention(nnx.Module):
    """Multi-head self-attention (``query``, ``key``, ``value``, ``output``)."""

    def __init__(self, cfg: _config.BertConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query, self.key, self.value = (_linear(d, d, **kw) for _ in range(3))
        self.output = _linear(d, d, **kw)

    def __call__(self, x, mask, prefix_kv=None, ctx=None):
        b, t, d = x.shape
        h = self.num_heads
        q, k, v = (
            _hooks.proj(f, x, ctx, "attention/" + n).reshape(b, t, h, d // h)
            for f, n in ((self.query, "query"), (self.key, "key"), (self.value, "value"))
        )
        if prefix_kv is not None:  # (P, H, Dh) keys/values shared by the batch
            pk, pv = (
                jnp.broadcast_to(z.astype(k.dtype)[None], (b,) + z.shape)
                for z in prefix_kv
            )
            k = jnp.concatenate([pk, k], axis=1)
            v = jnp.concatenate([pv, v], axis=1)
            mask = jnp.concatenate(
                [jnp.ones((b, pk.shape[1]), jnp.bool_), mask], axis=1
            )
        s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        s = s * ((d // h) ** -0.5)
        s = jnp.where(mask[:, None, None, :], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhts,bshd->bthd", p, v)
        out = _hooks.add_attention(ctx, "attention", q, self, out)
        return _hooks.proj(self.output, out.reshape(b, t, d), ctx, "attention/output")


class Layer(nnx.Module):
    """Post-norm encoder layer."""

    def __init__(self, cfg: _config.BertConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = Attention(cfg, **kw)
        self.attention_norm = LayerNorm(
            cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype
        )
        self.intermediate = _linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.output = _linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.output_norm = LayerNorm(
            cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype
        )
        self.hidden_act = cfg.hidden_act

    def __call__(self, x, mask, prefix_kv=None, ctx=None):
        x = self.attention_norm(x + self.attention(x, mask, prefix_kv, ctx))
        inner = _activation(self.hidden_act)(
            _hooks.proj(self.intermediate, x, ctx, "intermediate")
        )
        return self.output_norm(x + _hooks.proj(self.output, inner, ctx, "output"))


class BertModel(nnx.Module):
    """BERT-family encoder returning the last hidden states.

    Args:
      cfg: the config.
      dtype: compute dtype (``None``: the parameter dtype).
      param_dtype: parameter storage dtype.
      rngs: initialisation RNGs (weights ~ N(0, 0.02), LayerNorm = (1, 0)).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> cfg = _config.BertConfig(vocab_size=16, hidden_size=8,
      ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
      >>> BertModel(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 3), jnp.int32)).shape
      (1, 3, 8)
    """

    def __init__(
        self,
        cfg: _config.BertConfig,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.embeddings = Embeddings(cfg, **kw)
        self.layers = nnx.List([Layer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])

    def _positions(self, tokens, mask, offset=0):
        # ``offset``: a prefix's length. Hugging Face BERT/RoBERTa count cached
        # (prefix) keys as earlier positions, so PEFT's prefix tuning puts the
        # real tokens at ``offset..``; peftjax does the same.
        cfg = self.config
        if cfg.model_type == "roberta":
            m = mask.astype(jnp.int32)
            return (jnp.cumsum(m, axis=1) + offset) * m + cfg.pad_token_id
        return jnp.broadcast_to(
            offset + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        prefix: Any = None,
        hooks: Any = None,
    ) -> jax.Array:
        """Returns the last hidden states ``(B, T, d)``.

        Args:
          tokens: int ids ``(B, T)``.
          attention_mask: ``(B, T)`` nonzero for real tokens (default all).
          token_type_ids: ``(B, T)`` segment ids (default zeros).
          prefix: per-layer prefix keys/values (prefix tuning / P-tuning v2,
            ``peftjax.adapters.prefix_tuning`` with ``num_kv_heads`` = the
            number of heads): an object with ``keys``/``values`` of shape
            ``(L, P, H, D)``, prepended to every layer's keys and values and
            always attended to (PEFT's past-key-values convention: the
            tokens' absolute positions start at ``P``, as in Hugging Face
            BERT/RoBERTa with a cache of length ``P``).
          hooks: a ``peftjax.models.Hooks`` called at every projection of every
            layer (names ``attention/query`` ... ``intermediate``, ``output``)
            and once per attention (``attention``); slots are token indices.

        Returns:
          The hidden states, in the compute dtype.
        """
        hooks = _hooks.check(hooks, "BertModel")
        cfg = self.config
        if prefix is not None and prefix.keys.shape[1] == 0:
            prefix = None  # a zero-length prefix is the base model, bit for bit
        if prefix is not None:
            want = (
                cfg.num_hidden_layers,
                prefix.keys.shape[1],
                cfg.num_attention_heads,
                cfg.hidden_size // cfg.num_attention_heads,
            )
            if prefix.keys.shape != want or prefix.values.shape != want:
                raise ValueError(
                    f"prefix keys/values have shapes {prefix.keys.shape}/"
                    f"{prefix.values.shape}; expected (L, P, H, D) = {want}"
                )
        mask = (
            jnp.ones(tokens.shape, jnp.bool_)
            if attention_mask is None
            else attention_mask.astype(jnp.bool_)
        )
        types = (
            jnp.zeros(tokens.shape, jnp.int32)
            if token_type_ids is None
            else token_type_ids
        )
        offset = 0 if prefix is None else prefix.keys.shape[1]
        if offset and offset + tokens.shape[1] + (
            cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0
        ) > cfg.max_position_embeddings:
            raise ValueError(
                f"prefix length {offset} plus {tokens.shape[1]} tokens exceeds "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        h = self.embeddings(tokens, self._positions(tokens, mask, offset), types)
        slots = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        for i, layer in enumerate(self.layers):
            kv = None if prefix is None else (prefix.keys[i], prefix.values[i])
            ctx = None if hooks is None else (hooks, jnp.asarray(i, jnp.int32), slots)
            h = layer(h, mask, kv, ctx)
        return h

    def embed(
        self, tokens: jax.Array, *, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Returns mean-pooled sentence embeddings ``(B, d)`` float32.

        Args:
          tokens: int ids ``(B, T)``.
          attention_mask: ``(B, T)`` nonzero for real tokens.

        Returns:
          The embeddings (not normalised).
        """
        return mean_pool(self(tokens, attention_mask=attention_mask), attention_mask)


class BertForSequenceClassification(BertModel):
    """The encoder plus a linear head on the mean-pooled states.

    Same paths as :class:`BertModel` plus ``classifier/{kernel,bias}``; logits
    are ``classifier(mean_pool(hidden, mask))``.

    Args:
      cfg: the config.
      num_labels: keyword-only; the number of classes.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: initialisation RNGs.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> cfg = _config.BertConfig(vocab_size=16, hidden_size=8,
      ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
      >>> m = nnx.eval_shape(lambda: BertForSequenceClassification(
      ...     cfg, num_labels=3, rngs=nnx.Rngs(0)))
      >>> m.classifier.kernel.shape
      (8, 3)
    """

    def __init__(
        self,
        cfg: _config.BertConfig,
        *,
        num_labels: int,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_labels < 1:
            raise ValueError(
                f"BertForSequenceClassification: num_labels must be >= 1, "
                f"got {num_labels}"
            )
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.classifier = _linear(
            cfg.hidden_size, num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        prefix: Any = None,
        hooks: Any = None,
    ) -> jax.Array:
        """Returns float32 class logits ``(B, num_labels)``.

        Args:
          tokens: int ids ``(B, T)``.
          attention_mask: ``(B, T)`` nonzero for real tokens.
          token_type_ids: ``(B, T)`` segment ids.
          prefix: per-layer prefix keys/values, as for ``BertModel``.
          hooks: a ``peftjax.models.Hooks``, as for ``BertModel``.

        Returns:
          The logits.
        """
        h = super().__call__(
            tokens,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            prefix=prefix,
            hooks=hooks,
        )
        pooled = mean_pool(h, attention_mask).astype(h.dtype)
        return self.classifier(pooled).astype(jnp.float32)

    def embed(
        self, tokens: jax.Array, *, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Returns mean-pooled sentence embeddings ``(B, d)`` float32 (no head).

        Args:
          tokens: int ids ``(B, T)``.
          attention_mask: ``(B, T)`` nonzero for real tokens.

        Returns:
          The embeddings.
        """
        return mean_pool(
            BertModel.__call__(self, tokens, attention_mask=attention_mask),
            attention_mask,
        )
