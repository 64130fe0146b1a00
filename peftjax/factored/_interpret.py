# SPDX-License-Identifier: Apache-2.0
"""The jaxpr interpreter that re-emits a model with factored adapted matmuls.

``Interpreter.run(jaxpr, consts, args)`` evaluates a jaxpr inside the caller's
trace (``jit``/``grad``/``vmap``), equation by equation. Equations that do not
touch an adapted kernel (a ``_sym.Sym``) are re-bound unchanged. Equations
that do:

* layout primitives (``convert_element_type``, ``transpose``, ``reshape``,
  ``squeeze``, unit ``broadcast_in_dim``, ``slice``/``dynamic_slice`` along a
  stacked-layer axis) update the ``Sym``;
* ``dot_general`` becomes the model's own product with the frozen base plus
  the adapter's cheap terms (``_sym.dot``); with a quantised base, a product
  with the base dequantised a tile of output columns at a time;
* ``conv_general_dilated`` with an adapted kernel whose delta is low-rank
  (``adapters.lora_conv``) becomes the model's own convolution plus
  ``s·conv1x1(conv(x, A), B)`` (``_conv.conv``);
* ``gather`` of whole rows of an unadapted quantised table (an embedding
  lookup) gathers the blocks and decodes only those rows (``_sym.gather``);
* ``jit``/``pjit``/``closed_call``/``custom_jvp_call``/``custom_vjp_call`` are
  inlined (for the custom-derivative calls this means the primal body is
  differentiated by ordinary autodiff, see the package docstring);
* ``scan`` (a stacked kernel in ``xs`` is sliced with its state), ``remat``
  (``jax.checkpoint``), ``cond``/``switch`` and ``while`` are rebuilt with the
  same parameters around an interpreted body;
* anything else materialises the kernel in its current view (adapted and
  dequantised), with one ``FactoredFallbackWarning`` per path.

Exports: ``Interpreter``, ``FactoredFallbackWarning``.
"""

import collections
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.extend as jex

from peftjax import quant
from peftjax.factored import _conv, _sym

_VIEWS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                    "sharding_constraint", "pvary", "transpose", "reshape",
                    "squeeze", "broadcast_in_dim"})
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call",
                     "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_REMAT = frozenset({"remat2", "checkpoint", "remat"})


class FactoredFallbackWarning(UserWarning):
    """An adapted kernel was materialised because an operation needs ``W'``."""


def _bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _sub(eqn: Any) -> Any:
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if name in eqn.params:
            return eqn.params[name]
    raise KeyError(eqn.primitive.name)


class Interpreter:
    """Re-evaluates jaxprs with factored adapted kernels (see module doc).

    Args:
      deterministic: if True, adapter dropout is not applied.
      stacklevel: forwarded to ``warnings.warn`` for the fallback warning.
      tile_bytes: the most dequantised bytes of a quantised kernel formed at once.
    """

    def __init__(self, *, deterministic: bool, stacklevel: int = 4,
                 tile_bytes: int = quant.DEFAULT_TILE_BYTES):
        self.deterministic = deterministic
        self.stacklevel = stacklevel
        self.tile_bytes = tile_bytes
        self.warned: set[str] = set()
        self.sites: collections.Counter = collections.Counter()
        self.factored_sites: collections.Counter = collections.Counter()

    # -- fallback -----------------------------------------------------------
    def fallback(self, x: Any, why: str) -> Any:
        if not isinstance(x, _sym.Sym):
            return x
        path = x.meta.path
        if path not in self.warned:
            self.warned.add(path)
            note = ""
            adapter = x.meta.adapter
            if adapter is not None and adapter.dropout and not self.deterministic:
                note = "; adapter dropout is not applied to this use"
            what = "adapted kernel" if adapter is not None else "kernel"
            cost = "a weight-sized W' and its cotangent"
            if x.is_quant:
                what = f"quantised {what}"
                cost = f"a float copy of the whole kernel ({x.meta.qformat!r})"
            warnings.warn(
                f"peftjax.factored: the {what} {path!r} (shape "
                f"{tuple(x.meta.dims.shape)}) is used by {why}, which the factored "
                f"path does not handle; it is materialised for that use ({cost})"
                f"{note}", FactoredFallbackWarning, stacklevel=self.stacklevel)
        return _sym.materialize(x)

    # -- evaluation ---------------------------------------------------------
    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], *,
            concrete_out: bool = True) -> list[Any]:
        """Evaluates ``jaxpr``; Sym outputs are materialised if ``concrete_out``."""
        env: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, jex.core.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = x
        for v, x in zip(jaxpr.invars, args, strict=True):
            env[v] = x
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            if any(isinstance(x, _sym.Sym) for x in invals):
                outs = self.eqn(eqn, invals)
            else:
                outs = _bind(eqn, invals)
            for v, o in zip(eqn.outvars, outs, strict=True):
                env[v] = o
        outs = [read(v) for v in jaxpr.outvars]
        if concrete_out:
            outs = [self.fallback(o, "being returned from a traced function")
                    for o in outs]
        return outs

    def eqn(self, eqn: Any, invals: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        if name in _VIEWS and isinstance(invals[0], _sym.Sym):
            s = invals[0]
            new = _sym.view(s, name, eqn.params, self._rebase(eqn, s, invals[1:]),
                            eqn.outvars[0].aval)
            if new is not None:
                return [new]
        elif name == "slice" and isinstance(invals[0], _sym.Sym):
            new = self._slice(eqn, invals[0])
            if new is not None:
                return [new]
        elif name == "dynamic_slice" and isinstance(invals[0], _sym.Sym) and not any(
                isinstance(x, _sym.Sym) for x in invals[1:]):
            new = self._dynamic_slice(eqn, invals)
            if new is not None:
                return [new]
        elif name == "dot_general":
            out = self._dot(eqn, invals)
            if out is not None:
                return [out]
        elif name == "conv_general_dilated" and isinstance(invals[1], _sym.Sym) and (
                not isinstance(invals[0], _sym.Sym)):
            out = self._conv(eqn, invals)
            if out is not None:
                return [out]
            why = ("`conv_general_dilated` (the factored convolution needs an adapter "
                   "whose delta is a LowRankDelta, e.g. adapters.lora_conv, and "
                   "no stacked-layer axis)")
            return _bind(eqn, [self.fallback(x, why) for x in invals])
        elif name == "gather" and isinstance(invals[0], _sym.Sym) and not isinstance(
                invals[1], _sym.Sym):
            out = _sym.gather(invals[0], invals[1], eqn.params)
            if out is not None:
                return [out]
        elif name in _INLINE:
            sub = _sub(eqn)
            return self.run(sub.jaxpr, sub.consts, invals, concrete_out=False)
        elif name in _REMAT:
            return self._remat(eqn, invals)
        elif name == "scan":
            return self._scan(eqn, invals)
        elif name == "cond":
            return self._cond(eqn, invals)
        elif name == "while":
            return self._while(eqn, invals)
        why = f"`{name}`"
        return _bind(eqn, [self.fallback(x, why) for x in invals])

    # -- handlers -----------------------------------------------------------
    @staticmethod
    def _rebase(eqn: Any, s: _sym.Sym, rest: Sequence[Any]) -> Any:
        """The primitive applied to a Sym's float base (a quantised one has none)."""
        return None if s.is_quant else _bind(eqn, [s.base, *rest])[0]

    def _slice(self, eqn: Any, s: _sym.Sym) -> Any:
        shape = s.shape
        start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
        strides = eqn.params["strides"] or (1,) * len(shape)
        cut = [a for a in range(len(shape))
               if (start[a], limit[a], strides[a]) != (0, shape[a], 1)]
        if len(cut) != 1 or strides[cut[0]] != 1:
            return None
        a = cut[0]
        return _sym.slice_batch(s, a, start[a], limit[a] - start[a],
                                self._rebase(eqn, s, []), eqn.outvars[0].aval)

    def _dynamic_slice(self, eqn: Any, invals: list[Any]) -> Any:
        s, idx = invals[0], invals[1:]
        shape, sizes = s.shape, eqn.params["slice_sizes"]
        cut = [a for a in range(len(shape)) if sizes[a] != shape[a]]
        if len(cut) != 1:
            return None
        a = cut[0]
        return _sym.slice_batch(s, a, idx[a], sizes[a], self._rebase(eqn, s, idx),
                                eqn.outvars[0].aval)

    def _dot(self, eqn: Any, invals: list[Any]) -> Any:
        lhs, rhs = invals
        if isinstance(lhs, _sym.Sym) and isinstance(rhs, _sym.Sym):
            rhs = self.fallback(rhs, "a product of two adapted kernels")
        s, other, is_lhs = (lhs, rhs, True) if isinstance(lhs, _sym.Sym) else (
            rhs, lhs, False)
        params = eqn.params

        def bind(a: Any, b: Any) -> Any:
            return _bind(eqn, [a, b])[0]

        key = self._site_key(s)
        out = _sym.dot(s, other, is_lhs, params, bind, key, tile_bytes=self.tile_bytes)
        if out is not None:
            self.factored_sites[s.meta.path] += 1
        return out

    def _site_key(self, s: Any) -> Any:
        """Counts a use of ``s``'s kernel; its dropout key for this use, or None.

        Each use (site) of an adapted kernel folds its ordinal into the leaf's
        key, so two matmuls of one kernel draw independent dropout masks.
        """
        key = None
        _, _, keys = s.parts
        dropout = s.meta.adapter is not None and s.meta.adapter.dropout
        if dropout and not self.deterministic and keys is not None:
            key = jax.random.fold_in(keys, self.sites[s.meta.path])
        self.sites[s.meta.path] += 1
        return key

    def _conv(self, eqn: Any, invals: list[Any]) -> Any:
        x, s = invals
        key = self._site_key(s)
        out = _conv.conv(s, x, eqn.params, lambda a, b: _bind(eqn, [a, b])[0], key)
        if out is not None:
            self.factored_sites[s.meta.path] += 1
        return out

    def _remat(self, eqn: Any, invals: list[Any]) -> list[Any]:
        p = eqn.params
        jaxpr = p["jaxpr"]
        closed = getattr(jaxpr, "jaxpr", jaxpr)
        consts = getattr(jaxpr, "consts", ())

        def body(*args):
            return self.run(closed, consts, args)

        kw = {"prevent_cse": p.get("prevent_cse", True), "policy": p.get("policy")}
        return list(jax.checkpoint(body, **kw)(*invals))

    def _scan(self, eqn: Any, invals: list[Any]) -> list[Any]:
        p = eqn.params
        nc, ncarry = p["num_consts"], p["num_carry"]
        consts = invals[:nc]
        carry = [self.fallback(x, "a `scan` carry") for x in invals[nc:nc + ncarry]]
        xs = []
        for x in invals[nc + ncarry:]:
            if isinstance(x, _sym.Sym):
                sliced = _sym.slice_leading(x)
                x = self.fallback(x, "a `scan` over a non-layer axis") if (
                    sliced is None) else sliced[0]
            xs.append(x)
        body_jaxpr = p["jaxpr"]

        def body(c, x):
            outs = self.run(body_jaxpr.jaxpr, body_jaxpr.consts, [*consts, *c, *x])
            return outs[:ncarry], outs[ncarry:]

        kw = {}
        if "_split_transpose" in p:
            kw["_split_transpose"] = p["_split_transpose"]
        c, ys = jax.lax.scan(body, carry, xs, length=p["length"],
                             reverse=p["reverse"], unroll=p["unroll"], **kw)
        return [*c, *ys]

    def _cond(self, eqn: Any, invals: list[Any]) -> list[Any]:
        index, ops = invals[0], invals[1:]
        if isinstance(index, _sym.Sym):
            index = self.fallback(index, "a `cond` predicate")

        def branch(b: Any):
            return lambda *a: self.run(b.jaxpr, b.consts, a)

        fns = [branch(b) for b in eqn.params["branches"]]
        return list(jax.lax.switch(index, fns, *ops))

    def _while(self, eqn: Any, invals: list[Any]) -> list[Any]:
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts = invals[:cn], invals[cn:cn + bn]
        carry = [self.fallback(x, "a `while_loop` carry") for x in invals[cn + bn:]]
        cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

        def cond_fun(c):
            return self.run(cj.jaxpr, cj.consts, [*cconsts, *c])[0]

        def body_fun(c):
            return self.run(bj.jaxpr, bj.consts, [*bconsts, *c])

        return list(jax.lax.while_loop(cond_fun, body_fun, carry))
