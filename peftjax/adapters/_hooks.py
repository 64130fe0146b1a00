# SPDX-License-Identifier: Apache-2.0
"""Model hooks: per-token, input-dependent computation inside peftjax's models.

Weight-space adapters change parameters; a few methods cannot be written that
way because their update depends on the data at each position: aLoRA (the
adapter acts only from an invocation sequence on), Arrow and X-LoRA (a router
mixes LoRA experts per token), Poly (a mixture of skills per example, chosen
by task id), LLaMA-Adapter (a gated extra attention over learned prompts).
One generic hook covers them all instead of a keyword per method: the
models call it at every projection inside every layer and once per attention.

A hook is any object with these two methods (subclass ``Hooks`` to get the
identity for the one you do not need):

* ``linear(site, x, y) -> y'``: called after each projection inside a layer;
  ``x`` is the projection's input ``(B, T, in)``, ``y`` its output
  ``(B, T, out)`` (computed from the parameters the model was called with, so
  weight-space adapters and hooks compose).
* ``attention(site, q, attn) -> (B, T, H, D) | None``: called once per
  self-attention with the rotated queries ``q`` ``(B, T, H, D)`` and the
  attention module ``attn`` (its ``k_proj``/``v_proj``/... are callable); a
  returned array is added to the attention output before the output
  projection.

``site`` (a ``Site``) says where the call is: ``layer`` (an int32 scalar,
traced under ``scan_layers``: index per-layer arrays with it), ``name`` (the
projection's path inside the layer, a static string such as
``"self_attn/q_proj"``), and ``slots`` ``(T,)`` int32, each query token's
slot in the sequence (with a KV cache: ``cache.index + arange(T)``; with a
prefix: after the prefix). Per-example data (task ids, invocation starts,
routing weights) are fields of the hook object: hooks are closed over by the
traced forward pass, so they may hold traced arrays and a jitted step built on
them does not retrace when the data change.

Exports (``peftjax.adapters``, also ``peftjax.models``): ``Site``, ``Hooks``,
``compose`` (as ``compose_hooks``). They live with the adapters (no flax), so
the hook-based methods in ``peftjax.adapters`` subclass ``Hooks``.
"""

from typing import Any, NamedTuple

import jax


class Site(NamedTuple):
    """Where a hook is called.

    Attributes:
      layer: int32 scalar, the layer index (traced under ``scan_layers``).
      name: the module path inside the layer (static), e.g. ``"mlp/up_proj"``;
        ``"self_attn"`` (Llama) or ``"attention"`` (BERT) for ``attention``.
      slots: int32 ``(T,)``, the sequence slot of each query token.
    """

    layer: jax.Array
    name: str
    slots: jax.Array


class Hooks:
    """Base hook: the identity. Subclass and override what you need.

    Example:
      >>> import jax.numpy as jnp
      >>> class Double(Hooks):
      ...     def linear(self, site, x, y):
      ...         return 2 * y if site.name == "mlp/down_proj" else y
      >>> site = Site(jnp.int32(0), "mlp/down_proj", jnp.arange(3))
      >>> Double().linear(site, None, jnp.ones(2)).tolist()
      [2.0, 2.0]
    """

    def linear(self, site: Site, x: jax.Array, y: jax.Array) -> jax.Array:
        """Returns the projection's output (default: ``y`` unchanged)."""
        del site, x
        return y

    def attention(self, site: Site, q: jax.Array, attn: Any) -> jax.Array | None:
        """Returns an extra attention output ``(B, T, H, D)`` or ``None``."""
        del site, q, attn
        return None


@jax.tree_util.register_pytree_node_class
class _Composed(Hooks):
    """Hooks run in order; a pytree whose children are the hooks."""

    def __init__(self, hooks: tuple[Any, ...]):
        self.hooks = hooks

    def tree_flatten(self):
        return (self.hooks,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)

    def linear(self, site, x, y):
        for h in self.hooks:
            y = h.linear(site, x, y)
        return y

    def attention(self, site, q, attn):
        out = None
        for h in self.hooks:
            extra = h.attention(site, q, attn)
            if extra is not None:
                out = extra if out is None else out + extra
        return out


def compose(*hooks: Any) -> Hooks:
    """Runs several hooks: ``linear`` in order, ``attention`` outputs summed.

    Args:
      *hooks: objects with ``linear`` and ``attention`` (``None`` entries are
        skipped).

    Returns:
      One hook.

    Example:
      >>> import jax.numpy as jnp
      >>> class AddOne(Hooks):
      ...     def linear(self, site, x, y):
      ...         return y + 1
      >>> site = Site(jnp.int32(0), "mlp/up_proj", jnp.arange(1))
      >>> compose(AddOne(), None, AddOne()).linear(site, None, jnp.zeros(1)).tolist()
      [2.0]
    """
    hs = tuple(h for h in hooks if h is not None)
    for h in hs:
        for m in ("linear", "attention"):
            if not callable(getattr(h, m, None)):
                raise TypeError(
                    f"compose: hook {type(h).__name__} has no method {m!r}; "
                    "subclass peftjax.adapters.Hooks"
                )
    return _Composed(hs)
