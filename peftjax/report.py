# SPDX-License-Identifier: Apache-2.0
"""One reporting function for parameters, optimizer state, memory and FLOPs.

``report(step_fn, *args, params=..., trainable=..., opt_state=...)`` compiles
``step_fn`` once (it never runs it) and returns a ``Report`` with

* parameter, trainable-parameter counts and optimizer-state bytes;
* compiled memory from ``memory_analysis()``: ``argument + output + temp -
  alias`` bytes (never ``temp`` alone: XLA writes gradients into output
  buffers);
* FLOPs: ``flops_xla`` is XLA's ``cost_analysis()``, which counts a
  ``while``/``scan`` body once; ``flops`` walks the jaxpr and multiplies loop
  bodies by their trip counts (``dot_general`` as ``2·M·N·K``, elementwise
  and reduction primitives as one FLOP per element). On loop-free programs the
  two agree up to XLA's own accounting of elementwise work.

The demo, benchmarks and notebooks all use it (docs/architecture.md#measuring-on-a-shared-cpu).

Exports: ``Report``, ``ParamCount``, ``report``, ``count_params``,
``tree_bytes``, ``jaxpr_flops``.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.extend  # noqa: F401  (jax.extend.core.Jaxpr types)
import numpy as np

# Primitives counted as one FLOP per output element.
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "exp", "exp2",
    "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "sqrt", "rsqrt",
    "pow", "integer_pow", "erf", "erf_inv", "square", "select_n", "rem",
    "atan2", "cbrt", "tan", "clamp", "add_any",
})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "argmax",
                         "argmin", "cumsum", "cumlogsumexp", "cummax"})


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Trainable and total parameter counts; prints as one readable line.

    This is peftjax's one definition of "trainable %", used by ``report``,
    ``count_params`` and ``peftjax.tree.describe`` alike: ``100 · trainable /
    total``, where ``total`` counts every parameter of the adapted model, the
    base's plus those the adapters add (Hugging Face PEFT's
    ``print_trainable_parameters`` convention, so the numbers match PEFT's for
    the same model). It is printed with 4 decimals.

    Attributes:
      trainable: parameters that receive gradients.
      total: all parameters (base plus added adapter parameters).

    Example:
      >>> print(ParamCount(trainable=921_600, total=135_436_608))
      trainable params: 921,600 || all params: 135,436,608 || trainable%: 0.6805
    """

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        """``100 · trainable / total`` (0 for an empty model)."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: "
                f"{self.total:,} || trainable%: {self.percent:.4f}")


@dataclasses.dataclass(frozen=True)
class Report:
    """What a compiled step costs.

    Attributes:
      total_params: scalars in ``params`` (+ ``trainable`` when it is separate).
      trainable_params: scalars in ``trainable``.
      optimizer_state_bytes: bytes of the array leaves of ``opt_state``.
      argument_bytes, output_bytes, temp_bytes, alias_bytes: from
        ``memory_analysis()``.
      compiled_bytes: ``argument + output + temp - alias``.
      flops: jaxpr FLOPs with loop bodies multiplied by their trip counts.
      flops_xla: XLA's ``cost_analysis()["flops"]`` (loop bodies once).
      unknown_trip_loops: ``while`` loops whose trip count is unknown (counted
        once in ``flops``).
    """

    total_params: int | None
    trainable_params: int | None
    optimizer_state_bytes: int | None
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    compiled_bytes: int
    flops: float
    flops_xla: float
    unknown_trip_loops: int

    def as_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        def gib(b):
            for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
                if b >= scale:
                    return f"{b / scale:,.2f} {unit}"
            return f"{b} B"

        lines = []
        if self.total_params is not None:
            lines.append(str(ParamCount(self.trainable_params or 0,
                                        self.total_params)))
        if self.optimizer_state_bytes is not None:
            lines.append(f"optimizer state: {gib(self.optimizer_state_bytes)}")
        lines.append(
            f"compiled memory: {gib(self.compiled_bytes)} (arguments "
            f"{gib(self.argument_bytes)} + outputs {gib(self.output_bytes)} + temp "
            f"{gib(self.temp_bytes)} - aliased {gib(self.alias_bytes)})")
        lines.append(f"FLOPs per step: {self.flops:.4g} (XLA, loop bodies once: "
                     f"{self.flops_xla:.4g})")
        return "\n".join(lines)


def _size(x: Any) -> int:
    return math.prod(np.shape(x))


def tree_bytes(tree: Any) -> int:
    """Returns the total bytes of the array leaves of ``tree``.

    Args:
      tree: any pytree (arrays, ``ShapeDtypeStruct``, optax states).

    Returns:
      Bytes; typed PRNG keys count their key data.

    Example:
      >>> import jax.numpy as jnp
      >>> tree_bytes({"m": jnp.zeros((4, 2)), "count": jnp.zeros((), jnp.int32)})
      36
    """
    total = 0
    for x in jax.tree.leaves(tree):
        dtype = getattr(x, "dtype", None)
        if dtype is None:
            continue
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            total += _size(x) * 8
        else:
            total += _size(x) * np.dtype(dtype).itemsize
    return total


def count_params(params: Any, trainable: Any = None) -> ParamCount:
    """Counts parameters; ``str(result)`` prints a PEFT-style line.

    Args:
      params: the base parameter tree.
      trainable: the trainable pytree (adapter state, or a subset of params);
        None means everything in ``params`` is trainable.

    Returns:
      A ``ParamCount``. Adapter parameters are added to the total, as
      Hugging Face PEFT's ``print_trainable_parameters`` does.

    Example:
      >>> import jax.numpy as jnp
      >>> print(count_params({"w": jnp.zeros((10, 10))}, {"a": jnp.zeros(10)}))
      trainable params: 10 || all params: 110 || trainable%: 9.0909
    """
    total = sum(_size(x) for x in jax.tree.leaves(params))
    if trainable is None:
        return ParamCount(trainable=total, total=total)
    t = sum(_size(x) for x in jax.tree.leaves(trainable))
    return ParamCount(trainable=t, total=total + t)


def _sub_jaxprs(eqn: Any) -> list[Any]:
    subs = []
    for v in eqn.params.values():
        vals = v if isinstance(v, (tuple, list)) else (v,)
        for x in vals:
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                subs.append(x.jaxpr)
            elif isinstance(x, jax.extend.core.Jaxpr):
                subs.append(x)
    return subs


def _walk(jaxpr: Any) -> tuple[float, int]:
    flops = 0.0
    unknown = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[d] for d in lc)
            flops += 2.0 * _size(eqn.outvars[0].aval) * k
        elif name in _ELEMENTWISE:
            flops += float(sum(_size(v.aval) for v in eqn.outvars))
        elif name in _REDUCTIONS:
            flops += float(sum(_size(v.aval) for v in eqn.invars))
        elif name == "scan":
            body, u = _walk(eqn.params["jaxpr"].jaxpr)
            flops += body * eqn.params["length"]
            unknown += u
        elif name == "while":
            body, u = _walk(eqn.params["body_jaxpr"].jaxpr)
            cond, u2 = _walk(eqn.params["cond_jaxpr"].jaxpr)
            flops += body + cond
            unknown += 1 + u + u2
        elif name == "cond":
            branches = [_walk(b.jaxpr) for b in eqn.params["branches"]]
            flops += max(b[0] for b in branches)
            unknown += max(b[1] for b in branches)
        else:
            for sub in _sub_jaxprs(eqn):
                f, u = _walk(sub)
                flops += f
                unknown += u
    return flops, unknown


def jaxpr_flops(fn: Callable, *args: Any) -> tuple[float, int]:
    """Counts FLOPs of ``fn(*args)`` from its jaxpr, loops multiplied out.

    Args:
      fn: the function.
      *args: example arguments (arrays or ``ShapeDtypeStruct``).

    Returns:
      ``(flops, unknown_trip_loops)``.

    Example:
      >>> import jax.numpy as jnp
      >>> jaxpr_flops(lambda a, b: a @ b, jnp.ones((2, 3)), jnp.ones((3, 4)))
      (48.0, 0)
    """
    closed = jax.make_jaxpr(fn)(*args)
    return _walk(closed.jaxpr)


def report(step_fn: Callable, *args: Any, params: Any = None,
           trainable: Any = None, opt_state: Any = None,
           static_argnums: tuple[int, ...] = (),
           donate_argnums: tuple[int, ...] = ()) -> Report:
    """Compiles ``step_fn(*args)`` (without running it) and reports its cost.

    Args:
      step_fn: the training step (jitted or not).
      *args: its arguments (arrays or ``jax.ShapeDtypeStruct``).
      params: the base parameters, for the parameter counts.
      trainable: the trainable pytree, for the trainable count.
      opt_state: the optimizer state, for its bytes.
      static_argnums: forwarded to ``jax.jit``.
      donate_argnums: forwarded to ``jax.jit`` (donated buffers show up as
        aliased bytes).

    Returns:
      A ``Report``; ``print(report(...))`` gives a short summary.

    Example:
      >>> import jax.numpy as jnp
      >>> r = report(lambda w, x: (x @ w).sum(), jnp.ones((4, 3)), jnp.ones((2, 4)))
      >>> r.flops >= 48
      True
    """
    fn = getattr(step_fn, "__wrapped__", step_fn)
    jitted = jax.jit(fn, static_argnums=static_argnums,
                     donate_argnums=donate_argnums)
    compiled = jitted.lower(*args).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX returned a list of dicts
        cost = cost[0] if cost else {}
    dyn = [a for i, a in enumerate(args) if i not in static_argnums]
    statics = {i: a for i, a in enumerate(args) if i in static_argnums}

    def call(*dyn_args):
        it = iter(dyn_args)
        full = [statics[i] if i in statics else next(it) for i in range(len(args))]
        return fn(*full)

    flops, unknown = jaxpr_flops(call, *dyn)
    counts = None
    if params is not None or trainable is not None:
        counts = count_params(params if params is not None else {}, trainable)
    argument = int(mem.argument_size_in_bytes)
    output = int(mem.output_size_in_bytes)
    temp = int(mem.temp_size_in_bytes)
    alias = int(mem.alias_size_in_bytes)
    return Report(
        total_params=counts.total if counts else None,
        trainable_params=counts.trainable if counts else None,
        optimizer_state_bytes=tree_bytes(opt_state) if opt_state is not None else None,
        argument_bytes=argument,
        output_bytes=output,
        temp_bytes=temp,
        alias_bytes=alias,
        compiled_bytes=argument + output + temp - alias,
        flops=flops,
        flops_xla=float(cost.get("flops", 0.0)),
        unknown_trip_loops=unknown,
    )
