# SPDX-License-Identifier: Apache-2.0
"""Batch sharding of ``scan`` loop carries, without touching model code.

A model that scans over stacked layers carries its activations ``h (B, T, d)``
through a ``while`` loop. With FSDP the kernels sliced inside the loop are
split over ``fsdp`` on an axis that ``h @ W`` contracts, and XLA's
partitioners (Shardy and GSPMD alike) then give the loop carry one sharding
for the whole loop: on SmolLM2 they replicate the batch and split heads
instead, so every device holds every example's activations (the unrolled
model, where each layer is partitioned on its own, keeps the batch split).
Pinning the carry to the batch sharding inside the loop is what models do
with ``with_sharding_constraint`` in their layers; this module does it from
outside: it traces the function to a jaxpr and re-evaluates it with every
``scan`` carry whose leading axis has the global batch size constrained to
``batch_sharding(mesh)``. The rest of the program is bound unchanged, so
the results are identical.

Exports: ``constrain_scan_carries``.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jcore

from peftjax.shard import _mesh


def _eval(jaxpr: Any, consts: list[Any], args: list[Any], pin: Callable) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "scan":
            outs = _scan(eqn.params, invals, pin)
        elif name in ("pjit", "jit"):
            inner = eqn.params["jaxpr"]
            outs = _eval(inner.jaxpr, list(inner.consts), invals, pin)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _scan(params: dict[str, Any], invals: list[Any], pin: Callable) -> list[Any]:
    nc, nk = params["num_consts"], params["num_carry"]
    body = params["jaxpr"]
    consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]

    def step(carry, x):
        carry = [pin(c) for c in carry]
        outs = _eval(body.jaxpr, list(body.consts), list(consts) + carry + list(x), pin)
        return [pin(c) for c in outs[:nk]], outs[nk:]

    carry, ys = jax.lax.scan(
        step,
        [pin(c) for c in init],
        list(xs),
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    return list(carry) + list(ys)


def constrain_scan_carries(
    fn: Callable[..., Any], mesh: Any, *, batch_size: int
) -> Callable[..., Any]:
    """Wraps ``fn`` so that batch-sized ``scan`` carries stay batch-sharded.

    Every ``jax.lax.scan`` inside ``fn`` (nested ones and those inside
    ``jit`` included) gets ``with_sharding_constraint(carry,
    batch_sharding(mesh))`` on each carry whose leading axis is
    ``batch_size``, at loop entry and at the end of every iteration. Values
    are unchanged; only placement is. Use it on a loss or apply function of
    a model with scanned layers under FSDP (``peftjax.factored`` and
    ``jax.grad`` compose with the result).

    Args:
      fn: any function (e.g. ``loss_fn(params, batch)``).
      mesh: the training mesh; its ``data``/``fsdp`` axes split the batch.
      batch_size: the global batch size ``B`` (the leading axis of the
        activations carried through the loop).

    Returns:
      A function with ``fn``'s signature and results.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax.shard import make_mesh
      >>> def f(x, w):
      ...     return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]
      >>> g = constrain_scan_carries(f, make_mesh(devices=jax.devices()[:1]),
      ...                            batch_size=2)
      >>> x, w = jnp.ones((2, 3)), jnp.ones((4, 3, 3)) * 0.1
      >>> bool(jnp.array_equal(g(x, w), f(x, w)))
      True
    """
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(
            "constrain_scan_carries: batch_size must be a positive int, got "
            f"{batch_size!r}"
        )

    def pin(x):
        shape = getattr(x, "shape", ())
        if len(shape) >= 1 and shape[0] == batch_size:
            return jax.lax.with_sharding_constraint(
                x, _mesh.batch_sharding(mesh, len(shape))
            )
        return x

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        closed, out_shape = jax.make_jaxpr(
            lambda *a: fn(*a, **kwargs), return_shape=True
        )(*args)
        outs = _eval(closed.jaxpr, list(closed.consts), jax.tree.leaves(args), pin)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return wrapped
