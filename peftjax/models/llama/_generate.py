# SPDX-License-Identifier: Apache-2.0
"""KV-cache generation for the Llama family: greedy, temperature, top-k, top-p.

The whole generation (prefill of the left-padded prompt, then one cached
decoding step per token under ``jax.lax.scan``) is one jitted function with a
static cache length, so it compiles once per (shapes, sampling) pair. Nucleus
sampling follows "The Curious Case of Neural Text Degeneration", Holtzman et
al., 2019, https://arxiv.org/abs/1904.09751.

Exports: ``Sampling``, ``sample_logits``, ``generate``.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _hooks
from peftjax.models.llama import _model


class _Prefix(NamedTuple):
    keys: jax.Array
    values: jax.Array


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


class Sampling(NamedTuple):
    """How the next token is chosen (all fields static under ``jit``).

    Attributes:
      temperature: ``0.0`` means greedy (argmax); otherwise logits are divided
        by it before sampling.
      top_k: keep only the ``top_k`` most likely tokens (``None``: all).
      top_p: keep the smallest set of most likely tokens whose probability
        reaches ``top_p`` (``None``: all).

    Example:
      >>> Sampling(temperature=0.7, top_p=0.9).top_k is None
      True
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None


_GREEDY = Sampling()


def sample_logits(
    logits: jax.Array, key: jax.Array | None, sampling: Sampling = _GREEDY
) -> jax.Array:
    """Picks one token per row of ``logits`` ``(B, V)``.

    Args:
      logits: float logits.
      key: a PRNG key (unused, and may be ``None``, when greedy).
      sampling: the rule; static.

    Returns:
      int32 token ids ``(B,)``.

    Raises:
      ValueError: a negative temperature, ``top_k < 1`` or ``top_p`` outside
        ``(0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> sample_logits(jnp.array([[0.0, 2.0, 1.0]]), None).tolist()
      [1]
    """
    if sampling.temperature < 0:
        raise ValueError(
            f"sample_logits: temperature must be >= 0, got {sampling.temperature}"
        )
    if sampling.top_k is not None and sampling.top_k < 1:
        raise ValueError(f"sample_logits: top_k must be >= 1, got {sampling.top_k}")
    if sampling.top_p is not None and not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(
            f"sample_logits: top_p must be in (0, 1], got {sampling.top_p}"
        )
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sample_logits: a PRNG key is needed when temperature > 0")
    logits = logits / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep_sorted = before < sampling.top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "cache_len", "sampling", "eos_id",
                     "hooks_def"),
)
def _generate(
    graphdef, state, prompt, mask, key, soft, hook_leaves, *, max_new_tokens,
    cache_len, sampling, eos_id, hooks_def
):
    model = nnx.merge(graphdef, state)
    b = prompt.shape[0]
    hooks = None if hooks_def is None else jax.tree.unflatten(hooks_def, hook_leaves)
    prompt_embeddings, prefix = soft
    cache = model.init_cache(
        b, cache_len, dtype=model.embed_tokens.embedding.dtype,
        prefix=None if prefix is None else _Prefix(*prefix),
    )
    logits, cache = model.decode(
        prompt, cache, attention_mask=mask, prompt_embeddings=prompt_embeddings,
        hooks=hooks,
    )
    key, sub = jax.random.split(key)
    first = sample_logits(logits[:, -1], sub, sampling)
    done = jnp.zeros((b,), jnp.bool_) if eos_id is None else first == eos_id

    def step(carry, _):
        cache, tok, done, key = carry
        logits, cache = model.decode(tok[:, None], cache, hooks=hooks)
        key, sub = jax.random.split(key)
        nxt = sample_logits(logits[:, -1], sub, sampling)
        if eos_id is not None:
            nxt = jnp.where(done, jnp.int32(eos_id), nxt)
            done = done | (nxt == eos_id)
        return (cache, nxt, done, key), nxt

    _, rest = jax.lax.scan(
        step, (cache, first, done, key), None, length=max_new_tokens - 1
    )
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(
    model: _model.LlamaForCausalLM,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    prompt_mask: jax.Array | None = None,
    sampling: Sampling = _GREEDY,
    key: jax.Array | None = None,
    cache_len: int | None = None,
    eos_id: int | None = None,
    prompt_embeddings: jax.Array | None = None,
    prefix: Any = None,
    hooks: Any = None,
) -> jax.Array:
    """Generates ``max_new_tokens`` tokens after a (left-padded) prompt.

    With ``prompt_embeddings``, ``prefix`` or ``hooks`` each step computes what
    ``model(..., prompt_embeddings=, prefix=, hooks=)`` computes on the whole
    sequence: greedy generation equals repeated full forward passes.

    Args:
      model: the causal LM (unrolled or scanned layers).
      prompt: int ids ``(B, T)``; rows shorter than ``T`` are left-padded.
      max_new_tokens: number of tokens to produce (static).
      prompt_mask: ``(B, T)`` nonzero for real prompt tokens (default all).
      sampling: greedy by default; static.
      key: PRNG key for sampling (default ``jax.random.key(0)``).
      cache_len: static KV-cache length (default ``T + max_new_tokens``).
      eos_id: once a row emits it, the row keeps emitting it (static).
      prompt_embeddings: a soft prompt ``(P, d)`` or ``(B, P, d)`` before the
        prompt (prompt tuning).
      prefix: prefix keys/values ``(L, P, KV, D)`` (prefix tuning), an object
        with ``keys`` and ``values``.
      hooks: a ``peftjax.models.Hooks`` that is a JAX pytree (its arrays are
        arguments of the jitted generation, e.g. a ``flax.struct.dataclass``),
        called at every step; ``Site.slots`` are cache slots.

    Returns:
      int32 ids ``(B, max_new_tokens)``.

    Raises:
      ValueError: ``max_new_tokens < 1`` or a cache too short for the request.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from peftjax.models.llama import _config
      >>> cfg = _config.LlamaConfig(vocab_size=16, hidden_size=8,
      ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
      ...     num_key_value_heads=1)
      >>> m = _model.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
      >>> generate(m, jnp.ones((2, 3), jnp.int32), max_new_tokens=4).shape
      (2, 4)
    """
    b, t = prompt.shape
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    n_soft = 0 if prompt_embeddings is None else prompt_embeddings.shape[-2]
    n_soft += 0 if prefix is None else prefix.keys.shape[1]
    need = n_soft + t + max_new_tokens - 1
    cache_len = need if cache_len is None else cache_len
    if cache_len < need:
        raise ValueError(
            f"generate: cache_len={cache_len} < soft prompt/prefix length "
            f"{n_soft} + prompt length {t} + max_new_tokens {max_new_tokens} - 1"
        )
    mask = (
        jnp.ones((b, t), jnp.bool_)
        if prompt_mask is None
        else prompt_mask.astype(jnp.bool_)
    )
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if key is None else key
    hooks = _hooks.check(hooks, "generate")
    hook_leaves, hooks_def = (), None
    if hooks is not None:
        hook_leaves, hooks_def = jax.tree.flatten(hooks)
        bad = [type(x).__name__ for x in hook_leaves if not _is_array(x)]
        if bad:
            raise TypeError(
                f"generate: hooks={type(hooks).__name__} is not a JAX pytree of "
                f"arrays (leaves of type {sorted(set(bad))}); register it, e.g. "
                "with flax.struct.dataclass, so generation can pass its arrays"
            )
    soft = (
        None if prompt_embeddings is None else jnp.asarray(prompt_embeddings),
        None if prefix is None else (prefix.keys, prefix.values),
    )
    return _generate(
        graphdef,
        state,
        jnp.asarray(prompt, jnp.int32),
        mask,
        key,
        soft,
        tuple(hook_leaves),
        max_new_tokens=max_new_tokens,
        cache_len=cache_len,
        sampling=sampling,
        eos_id=eos_id,
        hooks_def=hooks_def,
    )
