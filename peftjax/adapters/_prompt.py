# SPDX-License-Identifier: Apache-2.0
"""Soft prompts and prefixes: prompt tuning, prefix tuning, P-tuning v2.

The Power of Scale for Parameter-Efficient Prompt Tuning. Lester et al., 2021.
https://arxiv.org/abs/2104.08691
Prefix-Tuning: Optimizing Continuous Prompts for Generation. Li & Liang, 2021.
https://arxiv.org/abs/2101.00190
P-Tuning v2. Liu et al., 2022. https://arxiv.org/abs/2110.07602

Apart from the weight reparametrisations: these are NOT ``Adapter``s. They
change no leaf of the base tree, never go in an assignment, and nothing in
the adapter protocol or the tree-level verbs (``init``, ``materialize``,
``fold``, ``peftjax.factored``) sees them. They are new inputs to the model:
created here (pure, arrays only, trained as their own pytree) and consumed by
peftjax's models through documented call arguments (``peftjax.models``: the
Llama prompt embeddings, the BERT/Llama prefix keys and values). They live in
``peftjax.adapters`` as PEFT methods, below the models that consume them.

* Prompt tuning: ``P`` trainable embeddings ``E (P, d)`` prepended to the
  token embeddings: ``h_0 = [E; embed(x)]`` ↔ ``prompt_tuning``. Inits as in
  Hugging Face PEFT: ``PromptInit.RANDOM`` (``N(0, 1)``, torch's
  ``nn.Embedding`` default), ``PromptInit.SAMPLE_VOCAB`` (rows of the
  embedding table at random token ids) and ``PromptInit.TEXT`` (the rows of
  given token ids, repeated to length ``P``, PEFT's ``TEXT`` init).
* Prefix tuning: per layer ``P`` trainable keys and values prepended to the
  attention keys and values, following PEFT's past-key-values convention
  (they are used as given, after RoPE would have been applied; the real
  tokens' positions start at ``P``, Llama's RoPE and BERT's absolute
  positions alike, as in PEFT) ↔
  ``prefix_tuning``. With ``projection_hidden`` the prefix is reparametrised
  (Li & Liang §4.3; PEFT's ``prefix_projection``):
  ``[K; V] = W2 · tanh(W1 · E + b1) + b2`` from an embedding ``E (P, d)``.
  Without it the keys/values are trained directly, which is P-tuning v2's
  deep prompt tuning (PEFT implements P-tuning v2 as prefix tuning without
  projection).

Exports: ``PromptInit``, ``PromptParams``, ``PrefixParams``,
``PrefixProjection``, ``prompt_tuning``, ``prefix_tuning``, ``prefix_kv``.
"""

import enum
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class PromptInit(enum.Enum):
    """Initialisation of soft-prompt embeddings.

    Attributes:
      RANDOM: ``N(0, 1)``.
      SAMPLE_VOCAB: rows of the embedding table at uniformly drawn token ids.
      TEXT: rows of the given ``token_ids``, repeated/truncated to ``P``.
    """

    RANDOM = "random"
    SAMPLE_VOCAB = "sample_vocab"
    TEXT = "text"


class PromptParams(NamedTuple):
    """Trainable soft prompt.

    Attributes:
      embeddings: ``(P, d)``.
    """

    embeddings: jax.Array


class PrefixProjection(NamedTuple):
    """The prefix reparametrisation MLP (trainable during training only).

    Attributes:
      embedding: ``(P, d)``.
      w1: ``(d, hidden)``; b1: ``(hidden,)``.
      w2: ``(hidden, L·2·KV·D)``; b2: ``(L·2·KV·D,)``.
    """

    embedding: jax.Array
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array


class PrefixParams(NamedTuple):
    """Per-layer prefix keys and values (direct form, P-tuning v2).

    Attributes:
      keys: ``(L, P, KV, D)``.
      values: ``(L, P, KV, D)``.
    """

    keys: jax.Array
    values: jax.Array


def _check_positive(value: Any, name: str, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")
    return int(value)


def prompt_tuning(key: jax.Array, num_tokens: int, embedding_table: jax.Array, *,
                  init: PromptInit = PromptInit.RANDOM,
                  token_ids: Sequence[int] | None = None,
                  param_dtype: Any = jnp.float32) -> PromptParams:
    """Creates ``P`` soft-prompt embeddings for a model's embedding table.

    Trainable parameters: ``P·d``.

    Args:
      key: PRNG key.
      num_tokens: ``P`` (PEFT's ``num_virtual_tokens``), static.
      embedding_table: the model's ``(V, d)`` token embeddings (read only).
      init: a ``PromptInit`` member.
      token_ids: the ids for ``PromptInit.TEXT`` (e.g. a tokenised task
        description).
      param_dtype: storage dtype.

    Returns:
      ``PromptParams(embeddings (P, d))``.

    Raises:
      ValueError: a non-positive ``P``, a missing or out-of-range
        ``token_ids`` for ``TEXT``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> table = jnp.arange(12.0).reshape(6, 2)
      >>> p = prompt_tuning(jax.random.key(0), 3, table, init=PromptInit.TEXT,
      ...                   token_ids=[4, 1])
      >>> p.embeddings
      Array([[8., 9.],
             [2., 3.],
             [8., 9.]], dtype=float32)
    """
    num_tokens = _check_positive(num_tokens, "num_tokens", "prompt_tuning")
    if not isinstance(init, PromptInit):
        raise TypeError(f"prompt_tuning: init must be a PromptInit, got {init!r}")
    vocab, dim = embedding_table.shape
    if init is PromptInit.RANDOM:
        emb = jax.random.normal(key, (num_tokens, dim), jnp.float32)
    elif init is PromptInit.SAMPLE_VOCAB:
        ids = jax.random.randint(key, (num_tokens,), 0, vocab)
        emb = embedding_table[ids]
    else:
        if not token_ids:
            raise ValueError("prompt_tuning: PromptInit.TEXT needs token_ids")
        bad = [t for t in token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt_tuning: token_ids {bad[:10]} are outside the "
                             f"vocabulary of size {vocab}")
        reps = -(-num_tokens // len(token_ids))
        ids = jnp.asarray((list(token_ids) * reps)[:num_tokens], jnp.int32)
        emb = embedding_table[ids]
    return PromptParams(embeddings=emb.astype(param_dtype))


def prefix_tuning(key: jax.Array, num_tokens: int, *, num_layers: int,
                  num_kv_heads: int, head_dim: int, hidden_size: int | None = None,
                  projection_hidden: int | None = None, init_std: float = 0.02,
                  param_dtype: Any = jnp.float32) -> PrefixParams | PrefixProjection:
    """Creates per-layer prefix keys/values, directly or through an MLP.

    Trainable parameters: ``L·2·P·KV·D`` (direct, P-tuning v2), or
    ``P·d + d·h + h + h·L·2·KV·D + L·2·KV·D`` with the projection (drop the
    MLP after training: ``prefix_kv`` gives the direct form).

    Args:
      key: PRNG key.
      num_tokens: ``P``.
      num_layers: ``L``.
      num_kv_heads: ``KV``.
      head_dim: ``D``.
      hidden_size: ``d``, the embedding width of the projection's input
        (required with ``projection_hidden``).
      projection_hidden: width ``h`` of the reparametrisation MLP, or None.
      init_std: std of the normal initialisation.
      param_dtype: storage dtype.

    Returns:
      ``PrefixParams`` or ``PrefixProjection``.

    Example:
      >>> import jax
      >>> p = prefix_tuning(jax.random.key(0), 4, num_layers=2, num_kv_heads=1,
      ...                   head_dim=8)
      >>> p.keys.shape
      (2, 4, 1, 8)
    """
    for name, v in (("num_tokens", num_tokens), ("num_layers", num_layers),
                    ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        _check_positive(v, name, "prefix_tuning")
    shape = (num_layers, num_tokens, num_kv_heads, head_dim)
    if projection_hidden is None:
        kk, kv = jax.random.split(key)
        return PrefixParams(
            keys=(jax.random.normal(kk, shape) * init_std).astype(param_dtype),
            values=(jax.random.normal(kv, shape) * init_std).astype(param_dtype))
    _check_positive(projection_hidden, "projection_hidden", "prefix_tuning")
    if hidden_size is None:
        raise ValueError("prefix_tuning: projection_hidden needs hidden_size (d)")
    _check_positive(hidden_size, "hidden_size", "prefix_tuning")
    out = 2 * num_layers * num_kv_heads * head_dim
    ke, k1, k2 = jax.random.split(key, 3)

    def normal(k, s):
        return (jax.random.normal(k, s) * init_std).astype(param_dtype)

    return PrefixProjection(
        embedding=normal(ke, (num_tokens, hidden_size)),
        w1=normal(k1, (hidden_size, projection_hidden)),
        b1=jnp.zeros((projection_hidden,), param_dtype),
        w2=normal(k2, (projection_hidden, out)),
        b2=jnp.zeros((out,), param_dtype),
    )


def prefix_kv(params: PrefixParams | PrefixProjection, *, num_layers: int,
              num_kv_heads: int, head_dim: int) -> PrefixParams:
    """Returns the direct keys/values ``(L, P, KV, D)`` of either form.

    Args:
      params: from ``prefix_tuning``.
      num_layers: ``L``.
      num_kv_heads: ``KV``.
      head_dim: ``D``.

    Returns:
      ``PrefixParams``; the projection is applied as
      ``tanh(E W1 + b1) W2 + b2``, reshaped to ``(P, L, 2, KV, D)``.

    Example:
      >>> import jax
      >>> p = prefix_tuning(jax.random.key(0), 3, num_layers=2, num_kv_heads=1,
      ...                   head_dim=4, hidden_size=5, projection_hidden=6)
      >>> prefix_kv(p, num_layers=2, num_kv_heads=1, head_dim=4).values.shape
      (2, 3, 1, 4)
    """
    if isinstance(params, PrefixParams):
        return params
    if not isinstance(params, PrefixProjection):
        raise TypeError(f"prefix_kv: expected PrefixParams or PrefixProjection, got "
                        f"{type(params).__name__}")
    h = jnp.tanh(params.embedding @ params.w1 + params.b1[None, :])
    kv = h @ params.w2 + params.b2[None, :]
    p = params.embedding.shape[0]
    kv = kv.reshape(p, num_layers, 2, num_kv_heads, head_dim)
    kv = jnp.transpose(kv, (1, 2, 0, 3, 4))  # (L, 2, P, KV, D)
    return PrefixParams(keys=kv[:, 0], values=kv[:, 1])
