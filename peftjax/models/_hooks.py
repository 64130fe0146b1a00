# SPDX-License-Identifier: Apache-2.0
"""The models' side of the hooks: validating a ``hooks=`` argument.

The protocol itself (``Hooks``, ``Site``, ``compose_hooks``) is defined in
``peftjax.adapters`` (no flax) and re-exported by ``peftjax.models``.

Exports: nothing public (``Site``/``Hooks`` re-exported for the models;
``proj`` and ``add_attention`` are what the model layers call).
"""

from typing import Any

from peftjax.adapters import Hooks as Hooks
from peftjax.adapters import Site as Site
from peftjax.adapters import compose_hooks as compose_hooks


def check(hooks: Any, fn: str) -> Any:
    """Validates a ``hooks=`` argument (``None`` passes)."""
    if hooks is None:
        return None
    for m in ("linear", "attention"):
        if not callable(getattr(hooks, m, None)):
            raise TypeError(
                f"{fn}: hooks={type(hooks).__name__} has no method {m!r}; pass a "
                "peftjax.adapters.Hooks subclass"
            )
    return hooks


def proj(module: Any, x: Any, ctx: Any, name: str) -> Any:
    """``module(x)``, then the hook's ``linear`` when a hook context is set.

    ``ctx`` is ``None`` or ``(hooks, layer, slots)``, as the models pass it.
    """
    y = module(x)
    if ctx is None:
        return y
    hooks, layer, slots = ctx
    return hooks.linear(Site(layer, name, slots), x, y)


def add_attention(ctx: Any, name: str, q: Any, attn: Any, out: Any) -> Any:
    """``out`` plus the hook's extra attention output, checked for its shape."""
    if ctx is None:
        return out
    hooks, layer, slots = ctx
    extra = hooks.attention(Site(layer, name, slots), q, attn)
    if extra is None:
        return out
    if extra.shape != out.shape:
        raise ValueError(
            f"hooks.attention returned shape {extra.shape}; expected the attention "
            f"output's {out.shape} (B, T, H, D)")
    return out + extra.astype(out.dtype)
