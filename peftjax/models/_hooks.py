# SPDX-License-Identifier: Apache-2.0
"""The models' side of the hooks: validating a ``hooks=`` argument.

The protocol itself (``Hooks``, ``Site``, ``compose_hooks``) is defined in
``peftjax.adapters`` (no flax) and re-exported by ``peftjax.models``.

Exports: nothing public (``Site``/``Hooks`` re-exported for the models).
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
