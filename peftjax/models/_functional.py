# SPDX-License-Identifier: Apache-2.0
"""Pure-function view of peftjax's NNX models: ``(graphdef, params)`` + ``apply``.

Adapters and optimizers work on the pure parameter dict
``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (int keys for layer lists),
so a training step is ``loss(params) = f(apply(graphdef, materialize(...), x))``.

Exports: ``split_params``, ``rebuild``, ``apply``, ``param_shapes``.
"""

from typing import Any

import jax
from flax import nnx

from peftjax import tree


def split_params(model: nnx.Module) -> tuple[Any, dict]:
    """Splits a model into its static graph and its pure parameter dict.

    Args:
      model: an NNX model holding only ``nnx.Param`` variables (all of
        peftjax's models).

    Returns:
      ``(graphdef, params)`` with ``params`` a nested dict of arrays.

    Raises:
      ValueError: the model holds non-parameter state.

    Example:
      >>> from flax import nnx
      >>> g, p = split_params(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> sorted(p)
      ['bias', 'kernel']
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(
            "split_params: the model holds non-parameter state at "
            f"{tree.paths(nnx.to_pure_dict(rest))[:5]}"
        )
    return graphdef, nnx.to_pure_dict(params)


def rebuild(graphdef: Any, params: dict) -> nnx.Module:
    """Rebuilds the model from ``graphdef`` and a pure parameter dict.

    The inverse of :func:`split_params`.

    Args:
      graphdef: from :func:`split_params`.
      params: a pure dict with the same paths (e.g. after ``materialize``).

    Returns:
      The NNX model.

    Example:
      >>> from flax import nnx
      >>> g, p = split_params(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> rebuild(g, p).kernel.shape
      (2, 3)
    """
    return nnx.merge(graphdef, params)


def apply(graphdef: Any, params: dict, *args: Any, **kwargs: Any) -> Any:
    """Calls the model rebuilt from ``(graphdef, params)``: a pure function.

    Args:
      graphdef: from :func:`split_params`.
      params: the pure parameter dict.
      *args: forwarded to the model's ``__call__`` (e.g. ``tokens``).
      **kwargs: forwarded too (e.g. ``attention_mask=``).

    Returns:
      What the model returns (logits for the causal LMs).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> g, p = split_params(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> apply(g, p, jnp.ones((1, 2))).shape
      (1, 3)
    """
    return nnx.merge(graphdef, params)(*args, **kwargs)


def param_shapes(graphdef: Any, params: dict) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Returns ``{path: (shape, dtype)}`` of a pure parameter dict.

    Args:
      graphdef: unused except for symmetry with :func:`apply`; may be ``None``.
      params: the pure parameter dict.

    Returns:
      The flat shape table keyed by canonical path.

    Example:
      >>> import jax.numpy as jnp
      >>> param_shapes(None, {"a": {"b": jnp.zeros((2, 3))}})
      {'a/b': ((2, 3), dtype('float32'))}
    """
    del graphdef
    return {p: (tuple(x.shape), x.dtype) for p, x in tree.flatten(params)}
