# SPDX-License-Identifier: Apache-2.0
"""Cartridges: a trainable KV-cache prefix.

Cartridges: Lightweight and general-purpose long context representations via
self-study. Eyuboglu, Ehrlich, Arora, Guha, Zinsley, Liu, Tennien, Rudra,
Zou, Mirhoseini & Ré, 2025. https://arxiv.org/abs/2506.06266

A cartridge is a KV cache of ``P`` virtual tokens trained directly: per
layer, keys and values ``(P, KV, D)`` that the attention sees before the
real tokens (the same input as prefix tuning without projection, peftjax's
models' ``prefix=``). Hugging Face PEFT (``tuners/cartridge``, followed
here, also for its files) keeps the first ``num_frozen_tokens`` virtual
tokens frozen (default 1: the paper's attention-sink token) and offers the
paper's initialisations: random (torch's ``normal_``: ``N(0, 1)``) and the
KV cache of the first ``P`` tokens of a text run through the base model
(``initialize_kv_prefix_from_text``) ↔ ``cartridge(..., init_kv=)`` with
``cartridge_kv_from_cache`` on the ``KVCache`` of the model's ``decode``.
Cartridges compose by concatenating their tokens (PEFT's
``compose_cartridge_adapters``) ↔ ``cartridge_compose``.

The keys are cached after RoPE at positions ``0..P-1`` (as PEFT's), and the
models start the real tokens' positions at ``P``.

Exports: ``CartridgeParams``, ``cartridge``, ``cartridge_kv``,
``cartridge_kv_from_cache``, ``cartridge_compose``.
"""

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax.adapters import _prompt
from peftjax.adapters._prompt import PrefixParams  # noqa: F401 (doctest)


class CartridgeParams(NamedTuple):
    """A cartridge: frozen leading tokens and the trainable rest.

    Attributes:
      frozen: ``PrefixParams`` with ``(L, F, KV, D)`` keys/values (not trained).
      trainable: ``PrefixParams`` with ``(L, P-F, KV, D)`` keys/values.
    """

    frozen: _prompt.PrefixParams
    trainable: _prompt.PrefixParams


def _count(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"cartridge: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def _split(kv: _prompt.PrefixParams, frozen: int) -> CartridgeParams:
    return CartridgeParams(
        _prompt.PrefixParams(kv.keys[:, :frozen], kv.values[:, :frozen]),
        _prompt.PrefixParams(kv.keys[:, frozen:], kv.values[:, frozen:]))


@functools.partial(jax.jit, static_argnums=1)
def _normal_kv(key: jax.Array, shape: tuple[int, ...]) -> _prompt.PrefixParams:
    kk, kv = jax.random.split(key)
    return _prompt.PrefixParams(jax.random.normal(kk, shape), jax.random.normal(kv, shape))


def cartridge(key: jax.Array, num_tokens: int, *, num_layers: int, num_kv_heads: int,
              head_dim: int, num_frozen: int = 1,
              init_kv: _prompt.PrefixParams | None = None,
              param_dtype: Any = jnp.float32) -> CartridgeParams:
    """Creates a cartridge, random or from given keys/values.

    Trainable parameters: ``L·2·(P-F)·KV·D`` (PEFT's count).

    Args:
      key: PRNG key (random init).
      num_tokens: ``P`` (PEFT's ``num_virtual_tokens``).
      num_layers: ``L``.
      num_kv_heads: ``KV``.
      head_dim: ``D``.
      num_frozen: ``F`` (PEFT's ``num_frozen_tokens``), ``0 <= F <= P``.
      init_kv: keys/values ``(L, >=P, KV, D)`` to start from (their first
        ``P`` tokens; e.g. ``cartridge_kv_from_cache``), else ``N(0, 1)``.
      param_dtype: storage dtype.

    Returns:
      ``CartridgeParams``: train ``.trainable``, keep ``.frozen`` fixed.

    Raises:
      ValueError: bad sizes, or ``init_kv`` of another geometry.

    Example:
      >>> import jax
      >>> c = cartridge(jax.random.key(0), 4, num_layers=2, num_kv_heads=1, head_dim=8)
      >>> c.frozen.keys.shape, c.trainable.keys.shape
      ((2, 1, 1, 8), (2, 3, 1, 8))
    """
    p = _count(num_tokens, "num_tokens", 1)
    f = _count(num_frozen, "num_frozen", 0)
    if f > p:
        raise ValueError(f"cartridge: num_frozen={f} exceeds num_tokens={p}")
    shape = (_count(num_layers, "num_layers", 1), p, _count(num_kv_heads, "num_kv_heads", 1),
             _count(head_dim, "head_dim", 1))
    if init_kv is None:
        kv_all = _normal_kv(key, shape)
    else:
        ks, vs = init_kv.keys.shape, init_kv.values.shape
        if (len(ks) != 4 or ks != vs or ks[0] != shape[0] or ks[1] < p
                or ks[2:] != shape[2:]):
            raise ValueError(f"cartridge: init_kv keys/values have shapes {ks}/{vs}; "
                             f"expected (L, >=P, KV, D) with L, P, KV, D = {shape}")
        kv_all = _prompt.PrefixParams(init_kv.keys[:, :p], init_kv.values[:, :p])
    kv_all = jax.tree.map(lambda x: x.astype(param_dtype), kv_all)
    return _split(kv_all, f)


def cartridge_kv(params: CartridgeParams) -> _prompt.PrefixParams:
    """Returns the full prefix ``(L, P, KV, D)`` (frozen tokens first, no gradient).

    Args:
      params: ``CartridgeParams``.

    Returns:
      ``PrefixParams``: the models' ``prefix=``.

    Example:
      >>> import jax.numpy as jnp
      >>> kv = PrefixParams(jnp.ones((1, 3, 1, 2)), jnp.ones((1, 3, 1, 2)))
      >>> c = CartridgeParams(PrefixParams(kv.keys[:, :1], kv.values[:, :1]),
      ...                     PrefixParams(kv.keys[:, 1:], kv.values[:, 1:]))
      >>> cartridge_kv(c).keys.shape
      (1, 3, 1, 2)
    """
    if not isinstance(params, CartridgeParams):
        raise TypeError(f"cartridge_kv: expected CartridgeParams, got {type(params).__name__}")
    fr = jax.lax.stop_gradient(params.frozen)
    return _prompt.PrefixParams(
        jnp.concatenate([fr.keys, params.trainable.keys], axis=1),
        jnp.concatenate([fr.values, params.trainable.values], axis=1))


def cartridge_kv_from_cache(cache: Any, num_tokens: int, *, row: int = 0) -> _prompt.PrefixParams:
    """The first ``P`` cached tokens of one row of a model's KV cache.

    PEFT's ``initialize_kv_prefix_from_past_key_values``: run the text through
    the base model (``model.decode(tokens, model.init_cache(1, S))``, no
    padding) and take the first ``P`` cached keys/values.

    Args:
      cache: a ``KVCache`` (``k``/``v`` ``(L, B, S, KV, D)``, ``index``).
      num_tokens: ``P``.
      row: the batch row.

    Returns:
      ``PrefixParams`` ``(L, P, KV, D)``.

    Raises:
      ValueError: fewer than ``P`` cached tokens.

    Example:
      >>> import jax.numpy as jnp
      >>> from types import SimpleNamespace
      >>> c = SimpleNamespace(k=jnp.ones((2, 1, 5, 1, 4)), v=jnp.ones((2, 1, 5, 1, 4)),
      ...                     index=jnp.asarray(5))
      >>> cartridge_kv_from_cache(c, 3).keys.shape
      (2, 3, 1, 4)
    """
    p = _count(num_tokens, "num_tokens", 1)
    filled = int(cache.index)
    if filled < p or cache.k.shape[2] < p:
        raise ValueError(f"cartridge_kv_from_cache: need at least {p} cached tokens, "
                         f"the cache holds {filled}")
    return _prompt.PrefixParams(cache.k[:, row, :p], cache.v[:, row, :p])


def cartridge_compose(*params: CartridgeParams, num_frozen: int | None = None) -> CartridgeParams:
    """Concatenates cartridges' tokens (PEFT's ``compose_cartridge_adapters``).

    Args:
      *params: two or more ``CartridgeParams`` of one geometry.
      num_frozen: frozen tokens of the result; default the first one's
        (as PEFT's).

    Returns:
      ``CartridgeParams`` of ``Σ P_i`` tokens.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> kv = PrefixParams(jnp.zeros((1, 5, 1, 2)), jnp.zeros((1, 5, 1, 2)))
      >>> a = cartridge(jax.random.key(0), 2, num_layers=1, num_kv_heads=1, head_dim=2,
      ...               init_kv=kv)
      >>> cartridge_compose(a, a).trainable.keys.shape
      (1, 3, 1, 2)
    """
    if len(params) < 2:
        raise ValueError("cartridge_compose: needs at least 2 cartridges")
    full = [cartridge_kv(p) for p in params]
    if len({x.keys.shape[:1] + x.keys.shape[2:] for x in full}) != 1:
        raise ValueError(f"cartridge_compose: geometries differ: "
                         f"{[x.keys.shape for x in full]}")
    f = params[0].frozen.keys.shape[1] if num_frozen is None else num_frozen
    kv = _prompt.PrefixParams(jnp.concatenate([x.keys for x in full], axis=1),
                              jnp.concatenate([x.values for x in full], axis=1))
    f = _count(f, "num_frozen", 0)
    if f > kv.keys.shape[1]:
        raise ValueError(f"cartridge_compose: num_frozen={f} exceeds {kv.keys.shape[1]} tokens")
    return _split(kv, f)
