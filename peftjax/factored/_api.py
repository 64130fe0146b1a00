# SPDX-License-Identifier: Apache-2.0
"""The public entry point: ``transform``.

``transform(apply_fn, assignment, trainable, frozen)`` returns a function with
``apply_fn``'s signature whose results equal ``apply_fn`` on
``materialize(assignment, params, trainable, frozen)``, computed without
forming ``W + ΔW``: ``apply_fn`` is traced to a jaxpr with the base params,
and the jaxpr is re-evaluated by ``_interpret.Interpreter`` with every
adapted kernel as a symbolic value.

Exports: ``transform`` (the training step that runs it is
``peftjax.train.trainer``).
"""

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from peftjax import adapters, quant, tree
from peftjax.factored import _interpret, _sym


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _leaf_keys(key: jax.Array, path: str, w: Any, adapter: adapters.Adapter) -> Any:
    dn = adapter.factored.dimension_numbers
    dims = tree.resolve(dn, np.shape(w), path=path)
    k = adapters.path_key(key, path)
    if not dims.batch:
        return k
    return jax.random.split(k, math.prod(dims.batch_shape)).reshape(dims.batch_shape)


def transform(
    apply_fn: Callable[..., Any],
    assignment: dict[str, adapters.Adapter],
    trainable: dict[str, Any],
    frozen: dict[str, Any],
    *,
    key: jax.Array | None = None,
    deterministic: bool = False,
    argnum: int = 0,
    tile_bytes: int = quant.DEFAULT_TILE_BYTES,
) -> Callable[..., Any]:
    """Turns ``apply_fn`` into its factored form for one adapter state.

    ``transform(apply_fn, assignment, trainable, frozen)(*args)`` equals
    ``apply_fn(*args)`` with ``args[argnum]`` replaced by
    ``materialize(assignment, args[argnum], trainable, frozen)``, but each
    adapted ``dot_general`` is computed as ``x@W + s·dropout(x)@A@B`` (and the
    matching forms of DoRA, LoRA-XS, scale-shift): no ``W + s·A@B`` and no
    weight-sized cotangent. Gradients flow to ``trainable`` (and to any other
    argument); the base params get a cotangent only if you differentiate them.
    Uses the factored path cannot handle are materialised with one
    ``FactoredFallbackWarning`` per path and call.

    Quantised leaves (``peftjax.quant.QuantizedArray``, adapted or not) are
    dequantised at each use: a matmul multiplies by the dequantised kernel a
    tile of output columns at a time (re-decoded in the backward pass), an
    embedding lookup decodes the rows it takes; no float copy of a whole
    quantised kernel is formed or kept. With an empty assignment this runs a
    quantised model as is. (DoRA's column norms need ``W`` itself: on a
    quantised base they dequantise the kernel once per use, under
    ``stop_gradient``.)

    Args:
      apply_fn: any function of a parameter tree (a Linen ``model.apply``-style
        function, ``peftjax.models.apply``, an NNX ``nnx.merge``-then-call
        function, or a whole loss function).
      assignment: ``{path: Adapter}`` from ``peftjax.tree.assign``.
      trainable: ``AdapterState.trainable`` (differentiate this).
      frozen: ``AdapterState.frozen``.
      key: PRNG key for adapter dropout; per-leaf keys fold in the path and
        split over stacked layers. Required when an adapter has dropout and
        ``deterministic`` is False.
      deterministic: skip adapter dropout (evaluation).
      argnum: position of the parameter tree in ``apply_fn``'s arguments.
      tile_bytes: the most bytes of a quantised kernel dequantised at once
        inside a matmul (a tile never spans all output columns).

    Returns:
      A function with ``apply_fn``'s signature (trace it under ``jit`` as you
      would ``apply_fn``).

    Raises:
      ValueError / TypeError: state from another tree or rule set (naming the
        path and shapes), or dropout without ``key``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, factored, tree
      >>> params = {"w": jnp.ones((4, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> f = lambda p, x: jnp.tanh(x @ p["w"])
      >>> y = factored.transform(f, a, *s)(params, jnp.ones((2, 4)))
      >>> bool(jnp.allclose(y, f(adapters.materialize(a, params, *s), jnp.ones((2, 4)))))
      True
    """
    if not isinstance(argnum, int) or isinstance(argnum, bool):
        raise TypeError(f"factored.transform: argnum must be an int, got {argnum!r}")
    with_dropout = {p: a.dropout for p, a in assignment.items() if a.dropout}
    if with_dropout and not deterministic and key is None:
        raise ValueError(
            f"factored.transform: adapters with input dropout {with_dropout} need a PRNG "
            "`key` (or deterministic=True for evaluation)")

    @functools.wraps(apply_fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not -len(args) <= argnum < len(args):
            raise ValueError(
                f"factored.transform: argnum={argnum} but the call has {len(args)} positional "
                "arguments; pass the parameter tree positionally")
        params = args[argnum]
        p_items = tree.flatten(params, is_leaf=quant.is_quantized)
        flat = dict(p_items)
        bias_of = adapters.validate(assignment, params, trainable, frozen,
                                    is_leaf=quant.is_quantized,
                                    caller="factored.transform")
        # Shared arrays (VB-LoRA's bank) into every leaf that uses them.
        t_of, f_of = adapters.resolve_shared(assignment, flat, trainable, frozen)
        interp = _interpret.Interpreter(deterministic=deterministic, stacklevel=4,
                                        tile_bytes=tile_bytes)

        p_def = jax.tree.structure(params, is_leaf=quant.is_quantized)
        pos = argnum % len(args)
        rest = (tuple(None if i == pos else a for i, a in enumerate(args)), kwargs)
        o_leaves, o_def = jax.tree.flatten(rest)

        p_vals, syms = [], {}
        for i, (path, leaf) in enumerate(p_items):
            quantized = quant.is_quantized(leaf)
            if path in bias_of:
                k = bias_of[path]
                hook = assignment[k].bias
                extra = ()
                if hook.kernel:  # the base kernel (GLoRA's b + W0ᵀ·C)
                    base = flat[k]
                    extra = (quant.dequantize(base) if quant.is_quantized(base) else base,)
                leaf = hook.apply(np.shape(flat[k]), leaf, t_of[k], f_of[k], *extra)
            elif path in assignment:
                adapter = assignment[path]
                if adapter.factored is None:
                    if quantized:
                        leaf = quant.dequantize(leaf)
                    leaf = _materialize_leaf(interp, path, adapter, leaf,
                                             t_of[path], f_of[path])
                    quantized = False
                else:
                    keys = None
                    if adapter.dropout and not deterministic:
                        keys = _leaf_keys(key, path, leaf, adapter)
                    syms[i] = _sym.from_leaf(path, adapter, leaf, t_of[path],
                                             f_of[path], keys)
            elif quantized:
                syms[i] = _sym.from_leaf(path, None, leaf, None, None, None)
            if quantized:  # traced as its logical float shape, evaluated as a Sym
                leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
            p_vals.append(leaf)

        all_leaves = p_vals + o_leaves
        dyn_idx = [i for i, x in enumerate(all_leaves) if _is_array(x)]
        n_p = len(p_vals)

        def flat_fn(*dyn):
            leaves = list(all_leaves)
            for i, x in zip(dyn_idx, dyn, strict=True):
                leaves[i] = x
            a, kw = jax.tree.unflatten(o_def, leaves[n_p:])
            a = list(a)
            a[pos] = jax.tree.unflatten(p_def, leaves[:n_p])
            return apply_fn(*a, **kw)

        dyn = [all_leaves[i] for i in dyn_idx]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*dyn)
        invals = [syms.get(i, x) for i, x in zip(dyn_idx, dyn, strict=True)]
        outs = interp.run(closed.jaxpr, closed.consts, invals)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return wrapped


def _materialize_leaf(interp: _interpret.Interpreter, path: str,
                      adapter: adapters.Adapter, leaf: Any, t: Any, f: Any) -> Any:
    if path not in interp.warned:
        interp.warned.add(path)
        warnings.warn(
            f"peftjax.factored: {adapter!r} on {path!r} (shape {tuple(np.shape(leaf))}) "
            "has no factored form; it is materialised (a weight-sized W' and its "
            "cotangent)", _interpret.FactoredFallbackWarning, stacklevel=4)
    return adapter.apply(leaf, t, f)

