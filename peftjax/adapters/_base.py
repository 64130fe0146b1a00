# SPDX-License-Identifier: Apache-2.0
"""The adapter protocol and the tree-level verbs over parameter pytrees.

An adapter is a reparametrisation ``W' = apply(W, trainable, frozen)`` of one
leaf. ``Adapter(init, apply, ...)`` holds pure functions with the
hyperparameters captured by its factory (``lora(rank=8)``). The tree-level
functions lift it over a whole parameter tree with an *assignment*
``{path: Adapter}`` produced by ``peftjax.tree.assign``:

* ``init(assignment, key, params) -> AdapterState(trainable, frozen)``, both
  flat dicts keyed by canonical path; per-leaf keys fold in a stable CRC32 of
  the path, so adding a rule never changes another leaf's initialisation;
* ``materialize(assignment, params, trainable, frozen) -> params'``, the
  portable forward path: a tree shaped like ``params`` with adapted leaves in
  their base dtype;
* ``merge`` (the export form) and ``unmerge`` (only where it is exact).

Memory note for ``materialize`` inside a loss: backpropagating through
``W + s·A@B`` forms a weight-shaped cotangent and the full ``x^T·dy`` matmul
for every adapted matrix (frozen, closed-over leaves get none). The factored
path of ``peftjax.factored`` avoids both.

Exports: ``Adapter``, ``AdapterState``, ``BiasHook``, ``FactoredTerms``,
``FactoredForm``, ``init``, ``materialize``, ``merge``, ``unmerge``,
``num_trainable``, ``lift_matrix``.
"""

import math
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.tree import _matrix, _paths

PyTree = Any


class BiasHook(NamedTuple):
    """How an adapter on a kernel also reparametrises its sibling bias leaf.

    Attributes:
      name: the sibling leaf's last path component (``"bias"``).
      apply: ``(bias (batch..., out), trainable, frozen) -> bias'`` per matrix.
      unapply: the exact inverse, or None.
      required: if True, ``init`` raises when the kernel has no such sibling.
    """

    name: str
    apply: Callable[..., jax.Array]
    unapply: Callable[..., jax.Array] | None = None
    required: bool = False


class FactoredTerms(NamedTuple):
    """One matrix's adapter as terms of ``y = ((x ⊙ in_scale) @ W + delta(x̃)) ⊙ out_scale``.

    This is how the factored path (``peftjax.factored``) applies an adapter without
    forming ``W'``: the base product ``(x ⊙ in_scale) @ W`` is the model's own
    matmul, ``x̃`` is the adapter input after adapter dropout, and every term
    is cheap (vectors, or products with rank-``r`` factors).

    Attributes:
      in_scale: ``(in,)`` scale of the input features, or None (= 1).
      out_scale: ``(out,)`` scale of the output units, or None (= 1).
      delta: ``x̃ (..., in) -> (..., out)`` additive term, or None (= 0). It
        may return a wider dtype than ``x̃``.

    Example:
      >>> import jax.numpy as jnp
      >>> t = FactoredTerms(out_scale=jnp.full((3,), 2.0))
      >>> t.in_scale is None, t.delta is None
      (True, True)
    """

    in_scale: jax.Array | None = None
    out_scale: jax.Array | None = None
    delta: Callable[[jax.Array], jax.Array] | None = None


class FactoredForm(NamedTuple):
    """What ``peftjax.factored`` needs to run an adapter in factored form.

    Attributes:
      dimension_numbers: the leaf's matrix view (None: Flax defaults).
      terms: per matrix, ``(w (in, out), trainable, frozen) -> FactoredTerms``
        with unbatched ``trainable``/``frozen``.
      apply: per matrix, ``(w (in, out), trainable, frozen) -> w'``: the
        weight-space form, used where a kernel is consumed by an operation
        the factored path does not handle (it then materialises, loudly).
    """

    dimension_numbers: _matrix.DimensionNumbers | None
    terms: Callable[..., FactoredTerms]
    apply: Callable[..., jax.Array]


class Adapter(NamedTuple):
    """A per-leaf reparametrisation ``W' = apply(W, trainable, frozen)``.

    Attributes:
      init: ``(key, w, *, stats=None) -> (trainable, frozen)``; ``trainable``
        and ``frozen`` are NamedTuples of arrays (``frozen`` may be None).
      apply: ``(w, trainable, frozen) -> w'`` with ``w'`` in ``w``'s dtype.
      unapply: exact inverse ``(w', trainable, frozen, aux) -> w`` or None
        when no exact inverse exists (``unmerge`` then raises ``TypeError``).
      merge_aux: ``(w, trainable, frozen) -> aux``: what ``merge`` must return
        so that ``unmerge`` is exact (DoRA's column norms), or None.
      bias: a ``BiasHook`` when the adapter also changes the sibling bias.
      dropout: rate of dropout on the adapter's input; only the factored path
        (``peftjax.factored``) can apply it, see ``materialize``.
      name: a readable description used in ``repr`` and error messages.
      factored: a ``FactoredForm`` for the factored path (``peftjax.factored``),
        or None when the adapter exists in weight space only (the factored
        path then materialises it, with a warning).
      dimension_numbers: the leaf's matrix view, or None (2-D ``(in, out)``;
        ``tree.assign`` fills it in for stacked and declared leaves).
      relayout: ``dims -> Adapter``: the same adapter with another view
        (``with_dimension_numbers``), or None if it cannot change.

    An ``Adapter`` is static configuration: close over assignments (or pass
    them as static arguments) rather than passing them to ``jit`` as arrays.
    """

    init: Callable[..., tuple[Any, Any]]
    apply: Callable[..., jax.Array]
    unapply: Callable[..., jax.Array] | None = None
    merge_aux: Callable[..., Any] | None = None
    bias: BiasHook | None = None
    dropout: float = 0.0
    name: str = "adapter"
    factored: FactoredForm | None = None
    dimension_numbers: _matrix.DimensionNumbers | None = None
    relayout: Callable[..., "Adapter"] | None = None

    def __repr__(self) -> str:
        return self.name

    def with_dimension_numbers(self, dims: _matrix.DimensionNumbers) -> "Adapter":
        """Returns this adapter viewing its leaf through ``dims``.

        Args:
          dims: the leaf's matrix view.

        Returns:
          The same method and hyperparameters with ``dims`` as its view.

        Raises:
          TypeError: the adapter cannot change its view.

        Example:
          >>> from peftjax import adapters, tree
          >>> a = adapters.lora(2).with_dimension_numbers(tree.dims.stacked())
          >>> a.dimension_numbers.batch_axis
          (0,)
        """
        if not isinstance(dims, _matrix.DimensionNumbers):
            raise TypeError(f"{self.name}: dims must be a DimensionNumbers, got {dims!r}")
        if self.relayout is None:
            raise TypeError(f"{self.name} has a fixed matrix view "
                            f"{self.dimension_numbers}; build it with "
                            "dimension_numbers= instead")
        return self.relayout(dims)

    def num_trainable(self, leaf: Any) -> int:
        """Returns the number of trainable parameters this adapter gives ``leaf``."""
        spec = jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
        trainable, _ = jax.eval_shape(
            lambda k, w: self.init(k, w), jax.random.key(0), spec
        )
        return sum(math.prod(x.shape) for x in jax.tree.leaves(trainable))


class AdapterState(NamedTuple):
    """Adapter parameters of a whole tree, keyed by canonical path.

    Attributes:
      trainable: ``{path: NamedTuple of arrays}`` (the differentiated pytree).
      frozen: ``{path: NamedTuple of arrays or None}`` (never differentiated).
    """

    trainable: dict[str, Any]
    frozen: dict[str, Any]


def path_key(key: jax.Array, path: str) -> jax.Array:
    """Folds a stable CRC32 of ``path`` into ``key`` (never Python's ``hash``).

    Args:
      key: the tree-level key.
      path: the leaf's canonical path.

    Returns:
      The leaf's key, identical across processes and rule sets.

    Example:
      >>> import jax
      >>> k = path_key(jax.random.key(0), "dense/kernel")
      >>> bool((jax.random.key_data(k) ==
      ...       jax.random.key_data(path_key(jax.random.key(0), "dense/kernel"))).all())
      True
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF)


def _describe_leaf(leaf: Any) -> str:
    dtype = getattr(leaf, "dtype", None)
    return f"shape {tuple(np.shape(leaf))}, dtype {dtype}"


def map_slices(fn: Callable, nbatch: int) -> Callable:
    """``fn`` over the slices of the leading ``nbatch`` axes, one after another.

    Used for initialisers instead of ``jax.vmap``: a vmapped SVD/QR lowers to
    one batched LAPACK call, and jaxlib's batched CPU LAPACK kernels split the
    batch over the same small thread pool the XLA program runs on. On a
    two-core machine a jitted init of stacked layers then deadlocks (each pool
    thread waits for chunks no free thread can run). ``lax.map`` issues one
    unbatched call per slice; init runs once, so the lost batching is cheap.

    Args:
      fn: per-slice function; every argument has the same leading batch axes.
      nbatch: number of leading batch axes.

    Returns:
      A function with ``fn``'s arguments plus the batch axes, whose outputs
      carry the batch axes in front.
    """

    def concrete(a: Any) -> bool:
        return isinstance(a, (jax.Array, np.ndarray))

    def run(*args: Any) -> Any:
        leaves, treedef = jax.tree.flatten(args)
        lead = tuple(leaves[0].shape[:nbatch])
        # Abstract leaves (``jax.ShapeDtypeStruct``, e.g. from ``quant.abstract``)
        # carry no values to map over: each slice sees the slice's struct.
        live = [k for k, a in enumerate(leaves) if concrete(a)]
        fixed = [
            a if concrete(a)
            else jax.ShapeDtypeStruct(tuple(a.shape[nbatch:]), a.dtype)
            for a in leaves
        ]

        def one(xs: list) -> Any:
            slice_leaves = list(fixed)
            for k, x in zip(live, xs, strict=True):
                slice_leaves[k] = x
            return fn(*jax.tree.unflatten(treedef, slice_leaves))

        flat = [leaves[k].reshape((-1,) + leaves[k].shape[nbatch:]) for k in live]
        out = jax.lax.map(one, flat)
        return jax.tree.map(lambda a: a.reshape(lead + a.shape[1:]), out)

    return run


def lift_matrix(
    *,
    name: str,
    init_matrix: Callable[..., tuple[Any, Any]],
    apply_matrix: Callable[..., jax.Array],
    unapply_matrix: Callable[..., jax.Array] | None = None,
    aux_matrix: Callable[..., Any] | None = None,
    bias: BiasHook | None = None,
    dimension_numbers: _matrix.DimensionNumbers | None = None,
    dropout: float = 0.0,
    factored_matrix: Callable[..., FactoredTerms] | None = None,
) -> Adapter:
    """Builds an ``Adapter`` from math written once for one ``(in, out)`` matrix.

    The leaf is viewed as ``(batch..., in, out)`` through ``dimension_numbers``
    (None: a 2-D ``(in, out)`` leaf; ``tree.assign`` fills in the view of
    stacked and declared leaves); the per-matrix functions
    are ``jax.vmap``-ed over each batch axis, so stacked layers get independent
    adapters. Per-slice PRNG keys are split from the leaf key.

    Args:
      name: description for ``repr`` and errors.
      init_matrix: ``(key, w (in, out), stats) -> (trainable, frozen)``.
      apply_matrix: ``(w (in, out), trainable, frozen) -> w' (in, out)``;
        it may return a wider dtype, the result is cast back to ``w.dtype``.
      unapply_matrix: exact inverse ``(w', trainable, frozen, aux) -> w``.
      aux_matrix: ``(w, trainable, frozen) -> aux`` kept by ``merge``.
      bias: optional bias hook (its functions are also per matrix).
      dimension_numbers: the matrix view of the leaf.
      dropout: adapter-input dropout rate (factored path only).
      factored_matrix: ``(w (in, out), trainable, frozen) -> FactoredTerms``,
        the per-matrix factored form used by ``peftjax.factored``; None if the
        adapter has none.

    Returns:
      The lifted ``Adapter``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> scale_cols = lift_matrix(
      ...     name="double",
      ...     init_matrix=lambda key, w, stats: (w[0] * 0 + 2.0, None),
      ...     apply_matrix=lambda w, t, f: w * t[None, :])
      >>> w = jnp.ones((3, 2, 4))  # stacked: one vector per layer
      >>> from peftjax.tree import dims
      >>> stacked = scale_cols.with_dimension_numbers(dims.stacked())
      >>> t, f = stacked.init(jax.random.key(0), w)
      >>> t.shape, float(stacked.apply(w, t, f).sum())
      ((3, 4), 48.0)
    """
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
    if dimension_numbers is not None and not isinstance(
            dimension_numbers, _matrix.DimensionNumbers):
        raise TypeError(f"{name}: dimension_numbers must be a "
                        f"peftjax.tree.DimensionNumbers or None, got {dimension_numbers!r}")
    again = dict(name=name, init_matrix=init_matrix, apply_matrix=apply_matrix,
                 unapply_matrix=unapply_matrix, aux_matrix=aux_matrix, bias=bias,
                 dropout=dropout, factored_matrix=factored_matrix)

    def resolved(w: Any) -> _matrix.ResolvedDims:
        shape = tuple(np.shape(w))
        dtype = getattr(w, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} needs a floating-point matrix leaf, got {_describe_leaf(w)}"
            )
        if len(shape) < 2:
            raise ValueError(
                f"{name} is a matrix adapter and cannot target a {len(shape)}-D "
                f"leaf ({_describe_leaf(w)}); exclude it with a `then=None` rule "
                "or use a vector method"
            )
        return _matrix.resolve(dimension_numbers, shape, path="leaf")

    def vmapped(fn: Callable, nbatch: int) -> Callable:
        for _ in range(nbatch):
            fn = jax.vmap(fn)
        return fn

    def init(key: jax.Array, w: jax.Array, *, stats: Any = None):
        r = resolved(w)
        m = _matrix.to_matrix(w, r)
        nb = len(r.batch)
        if nb:
            keys = jax.random.split(key, math.prod(r.batch_shape)).reshape(
                r.batch_shape
            )
            if stats is None:
                return map_slices(lambda k, x: init_matrix(k, x, None), nb)(keys, m)
            return map_slices(init_matrix, nb)(keys, m, stats)
        return init_matrix(key, m, stats)

    def apply(w: jax.Array, trainable: Any, frozen: Any) -> jax.Array:
        r = resolved(w)
        m = _matrix.to_matrix(w, r)
        out = vmapped(apply_matrix, len(r.batch))(m, trainable, frozen)
        return _matrix.from_matrix(out.astype(w.dtype), r)

    unapply = None
    if unapply_matrix is not None:

        def unapply(w: jax.Array, trainable: Any, frozen: Any, aux: Any):
            r = resolved(w)
            m = _matrix.to_matrix(w, r)
            out = vmapped(unapply_matrix, len(r.batch))(m, trainable, frozen, aux)
            return _matrix.from_matrix(out.astype(w.dtype), r)

    merge_aux = None
    if aux_matrix is not None:

        def merge_aux(w: jax.Array, trainable: Any, frozen: Any):
            r = resolved(w)
            m = _matrix.to_matrix(w, r)
            return vmapped(aux_matrix, len(r.batch))(m, trainable, frozen)

    hook = None
    if bias is not None:

        def lift_bias(fn: Callable) -> Callable:
            def lifted(w_shape, b, trainable, frozen, *extra):
                r = _matrix.resolve(dimension_numbers, w_shape, path="leaf")
                flat = b.reshape(r.batch_shape + (r.n_out,))
                out = vmapped(fn, len(r.batch))(flat, trainable, frozen, *extra)
                return out.astype(b.dtype).reshape(b.shape)

            return lifted

        hook = BiasHook(
            name=bias.name,
            apply=lift_bias(bias.apply),
            unapply=lift_bias(bias.unapply) if bias.unapply else None,
            required=bias.required,
        )

    return Adapter(
        init=init,
        apply=apply,
        unapply=unapply,
        merge_aux=merge_aux,
        bias=hook,
        dropout=float(dropout),
        name=name,
        factored=None if factored_matrix is None else FactoredForm(
            dimension_numbers=dimension_numbers, terms=factored_matrix,
            apply=apply_matrix),
        dimension_numbers=dimension_numbers,
        relayout=lambda dims: lift_matrix(**again, dimension_numbers=dims),
    )


class LowRank(NamedTuple):
    """An additive delta ``scale · left @ [core @] right`` of one matrix.

    Attributes:
      left: ``(in, r)``.
      right: ``(r, out)``.
      scale: a Python float folded into the product.
      core: optional ``(r, r)`` between the factors (LoRA-XS).
    """

    left: jax.Array
    right: jax.Array
    scale: float = 1.0
    core: jax.Array | None = None


def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, s: float,
             core: jax.Array | None = None) -> jax.Array:
    """Returns ``s·(x@a)@b`` (or ``s·((x@a)@core)@b``) without forming ``a@b``.

    Computed in the wider of ``x``'s and the factors' dtypes.

    Args:
      x: ``(..., in)``.
      a: ``(in, r)``.
      b: ``(r, out)``.
      s: the scale.
      core: optional ``(r, r)``.

    Returns:
      ``(..., out)``.

    Example:
      >>> import jax.numpy as jnp
      >>> low_rank(jnp.ones((2, 3)), jnp.ones((3, 1)), jnp.ones((1, 4)), 0.5)[0, 0]
      Array(1.5, dtype=float32)
    """
    ct = compute_dtype(x.dtype, a.dtype)
    h = x.astype(ct) @ a.astype(ct)
    if core is not None:
        h = h @ core.astype(ct)
    return (h * jnp.asarray(s, ct)) @ b.astype(ct)


def low_rank_forms(factors: Callable[[Any, Any], LowRank]) -> dict[str, Callable]:
    """Derives the weight-space, inverse and factored forms of an additive adapter.

    Args:
      factors: ``(trainable, frozen) -> LowRank`` for one matrix.

    Returns:
      ``apply_matrix``, ``unapply_matrix`` and ``factored_matrix`` keyword
      arguments for ``lift_matrix``: ``W ± delta`` in the wider dtype, and
      ``x@W + low_rank(x, ...)`` without forming the delta.

    Example:
      >>> import jax.numpy as jnp
      >>> forms = low_rank_forms(lambda t, f: LowRank(t[0], t[1], 2.0))
      >>> w = jnp.zeros((2, 2))
      >>> forms["apply_matrix"](w, (jnp.ones((2, 1)), jnp.ones((1, 2))), None)
      Array([[2., 2.],
             [2., 2.]], dtype=float32)
    """

    def delta(w, t, f):
        lr = factors(t, f)
        ct = compute_dtype(w.dtype, lr.left.dtype)
        left = lr.left.astype(ct)
        if lr.core is not None:
            left = left @ lr.core.astype(ct)
        return ct, (left @ lr.right.astype(ct)) * jnp.asarray(lr.scale, ct)

    def apply_matrix(w, t, f):
        ct, d = delta(w, t, f)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t, f)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        lr = factors(t, f)
        return FactoredTerms(
            delta=lambda x: low_rank(x, lr.left, lr.right, lr.scale, core=lr.core))

    return {"apply_matrix": apply_matrix, "unapply_matrix": unapply_matrix,
            "factored_matrix": factored_matrix}


def _sibling(path: str, name: str) -> str:
    head, _, _ = path.rpartition("/")
    return f"{head}/{name}" if head else name


def _check_assignment(assignment: Any, flat: dict[str, Any], fn: str) -> None:
    if not isinstance(assignment, dict):
        raise TypeError(
            f"{fn}: assignment must be a dict {{path: Adapter}} as returned by "
            f"peftjax.tree.assign, got {type(assignment).__name__}"
        )
    for path, adapter in assignment.items():
        if path not in flat:
            raise ValueError(
                f"{fn}: assignment targets {path!r}, which is not a leaf of params"
            )
        if not isinstance(adapter, Adapter):
            raise TypeError(
                f"{fn}: the payload for {path!r} is {type(adapter).__name__} "
                f"({adapter!r}), not a peftjax.adapters.Adapter"
            )


def _bias_targets(assignment: dict[str, Adapter], flat: dict[str, Any]
                  ) -> dict[str, str]:
    """Maps bias-leaf path -> kernel path for adapters with a bias hook."""
    out: dict[str, str] = {}
    for path, adapter in assignment.items():
        if adapter.bias is None:
            continue
        sib = _sibling(path, adapter.bias.name)
        if sib == path:
            raise ValueError(
                f"{adapter!r} is assigned to {path!r} ({_describe_leaf(flat[path])}), "
                f"which is itself a bias leaf: this adapter goes on a kernel and "
                f"reparametrises the kernel's sibling {adapter.bias.name!r} leaf too. "
                f"Target the kernel ({_sibling(path, 'kernel')!r}) and leave the bias "
                "out of the rule (e.g. where=r'.../kernel')"
            )
        if sib not in flat:
            if adapter.bias.required:
                raise ValueError(
                    f"{adapter.name} on {path!r} also reparametrises the bias, but "
                    f"there is no leaf {sib!r}; target a layer with a bias"
                )
            continue
        if sib in out:
            raise ValueError(
                f"{sib!r} would be reparametrised as the bias of both "
                f"{out[sib]!r} and {path!r}; give them separate bias leaves"
            )
        if sib in assignment:
            raise ValueError(
                f"{sib!r} is both assigned {assignment[sib]!r} and reparametrised "
                f"as the bias of {path!r} by {adapter!r}; keep one"
            )
        out[sib] = path
    return out


def init(
    assignment: dict[str, Adapter],
    key: jax.Array,
    params: PyTree,
    *,
    stats: dict[str, Any] | None = None,
) -> AdapterState:
    """Initialises every assigned adapter.

    Args:
      assignment: ``{path: Adapter}``, from ``peftjax.tree.assign``.
      key: a PRNG key (``jax.random.key``); leaf keys fold in a CRC32 of the
        path, so adding a rule never changes other leaves.
      params: the base parameter tree.
      stats: optional ``{path: statistics}`` for data-driven initialisers.

    Returns:
      ``AdapterState(trainable, frozen)``, both dicts keyed by path.

    Raises:
      ValueError / TypeError: naming the path, shape, dtype and adapter for a
        leaf the adapter cannot take (1-D, integer, rank too large, ...).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> a = tree.assign(params, [tree.Rule(where=".*kernel",
      ...                                    then=adapters.lora(rank=2))])
      >>> state = adapters.init(a, jax.random.key(0), params)
      >>> state.trainable["dense/kernel"].a.shape
      (4, 2)
    """
    flat = _paths.leaves_by_path(params)
    _check_assignment(assignment, flat, "init")
    _bias_targets(assignment, flat)
    stats = stats or {}
    extra = [p for p in stats if p not in assignment]
    if extra:
        raise ValueError(f"init: stats given for unassigned paths {extra[:10]}")
    trainable: dict[str, Any] = {}
    frozen: dict[str, Any] = {}
    for path, adapter in assignment.items():
        leaf = flat[path]
        try:
            kw = {"stats": stats[path]} if path in stats else {}
            t, f = adapter.init(path_key(key, path), leaf, **kw)
        except (ValueError, TypeError) as e:
            raise type(e)(
                f"init: {adapter!r} on {path!r} ({_describe_leaf(leaf)}): {e}"
            ) from e
        trainable[path] = t
        frozen[path] = f
    return AdapterState(trainable=trainable, frozen=frozen)


def _check_state(assignment: dict[str, Adapter], flat: dict[str, Any],
                 trainable: Any, frozen: Any, fn: str) -> None:
    for name, part in (("trainable", trainable), ("frozen", frozen)):
        if not isinstance(part, dict):
            raise TypeError(
                f"{fn}: {name} must be the dict from AdapterState.{name}, got "
                f"{type(part).__name__}"
            )
        missing = [p for p in assignment if p not in part]
        extra = [p for p in part if p not in assignment]
        if missing or extra:
            raise ValueError(
                f"{fn}: adapter state does not match the assignment: {name} lacks "
                f"{missing[:10]} and has unassigned paths {extra[:10]} "
                "(was it initialised for another tree or rule set?)"
            )
    for path, adapter in assignment.items():
        leaf = flat[path]
        spec = jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
        want_t, want_f = jax.eval_shape(
            lambda k, w, a=adapter: a.init(k, w), jax.random.key(0), spec
        )
        for name, want, got in (
            ("trainable", want_t, trainable[path]),
            ("frozen", want_f, frozen[path]),
        ):
            ws = jax.tree.map(lambda x: tuple(x.shape), want)
            gs = jax.tree.map(lambda x: tuple(np.shape(x)), got)
            if jax.tree.structure(ws) != jax.tree.structure(gs) or jax.tree.leaves(
                ws
            ) != jax.tree.leaves(gs):
                raise ValueError(
                    f"{fn}: {name} state for {path!r} ({_describe_leaf(leaf)}) has "
                    f"shapes {gs}, but {adapter!r} on this leaf needs {ws}; the "
                    "state was made for another tree"
                )
            _check_state_dtypes(fn, name, path, adapter, want, got)


def _check_state_dtypes(fn: str, name: str, path: str, adapter: Adapter,
                        want: Any, got: Any) -> None:
    """Raises if a state leaf's dtype differs from what ``adapter.init`` makes."""
    for (kp, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                          strict=True):
        g_dtype = getattr(g, "dtype", None)
        g_dtype = np.asarray(g).dtype if g_dtype is None else g_dtype
        if jnp.dtype(g_dtype) != jnp.dtype(w.dtype):
            field = jax.tree_util.keystr(kp, simple=True, separator="/")
            raise TypeError(
                f"{fn}: {name} state for {path!r}, field {field!r}, has dtype "
                f"{jnp.dtype(g_dtype).name}, but {adapter!r} makes it "
                f"{jnp.dtype(w.dtype).name} (its param_dtype); it would train in "
                f"{jnp.dtype(g_dtype).name}. Cast the state to "
                f"{jnp.dtype(w.dtype).name} or build the adapter with "
                f"param_dtype={jnp.dtype(g_dtype).name}"
            )


def _apply_all(assignment, params, trainable, frozen, fn: str, *,
               check_dropout: bool, deterministic: bool) -> PyTree:
    flat = _paths.leaves_by_path(params)
    _check_assignment(assignment, flat, fn)
    _check_state(assignment, flat, trainable, frozen, fn)
    bias_of = _bias_targets(assignment, flat)
    if check_dropout and not deterministic:
        with_dropout = {p: a.dropout for p, a in assignment.items() if a.dropout}
        if with_dropout:
            raise ValueError(
                f"{fn}: adapters with input dropout {with_dropout} cannot be "
                "applied in weight space; dropout on the adapter input is applied "
                "only by the factored path (peftjax.factored). Pass "
                "deterministic=True to materialise without dropout (evaluation), "
                "or build the adapter with dropout=0.0"
            )

    def one(path: str, w: Any) -> Any:
        if path in assignment:
            return assignment[path].apply(w, trainable[path], frozen[path])
        if path in bias_of:
            k = bias_of[path]
            hook = assignment[k].bias
            return hook.apply(np.shape(flat[k]), w, trainable[k], frozen[k])
        return w

    return _paths.map_with_path(one, params)


def materialize(
    assignment: dict[str, Adapter],
    params: PyTree,
    trainable: dict[str, Any],
    frozen: dict[str, Any],
    *,
    deterministic: bool = False,
) -> PyTree:
    """Returns ``params`` with every assigned leaf replaced by ``apply(...)``.

    This is the portable forward path: use it inside the loss and feed the
    result to any model. Un-assigned leaves are passed through by identity;
    adapted leaves keep their base dtype (the adapter term is computed in the
    wider of the base and adapter dtypes, then cast).

    Cost: gradients through ``W + s·A@B`` form a weight-shaped cotangent per
    adapted matrix; see ``peftjax.factored`` for the factored path.

    Args:
      assignment: ``{path: Adapter}``.
      params: the base tree (dict, Linen params, ``nnx.State``, Equinox).
      trainable: ``AdapterState.trainable``.
      frozen: ``AdapterState.frozen``.
      deterministic: must be True when an adapter has input dropout: dropout on
        the adapter input cannot be expressed as a weight, so ``materialize``
        refuses to silently ignore it.

    Returns:
      A tree with the structure of ``params``.

    Raises:
      ValueError: state from another tree, or dropout without
        ``deterministic=True``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((4, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> bool((adapters.materialize(a, params, *s)["w"] == params["w"]).all())
      True
    """
    return _apply_all(assignment, params, trainable, frozen, "materialize",
                      check_dropout=True, deterministic=deterministic)


def merge(
    assignment: dict[str, Adapter],
    params: PyTree,
    trainable: dict[str, Any],
    frozen: dict[str, Any],
    *,
    return_aux: bool = False,
) -> Any:
    """Folds the adapters into the base weights (the export form).

    Equivalent to ``materialize(..., deterministic=True)``: each merged leaf
    keeps its base dtype. Inputs are never modified or donated.

    Args:
      assignment: ``{path: Adapter}``.
      params: the base tree.
      trainable: ``AdapterState.trainable``.
      frozen: ``AdapterState.frozen``.
      return_aux: also return ``{path: aux}`` for adapters whose exact
        ``unmerge`` needs it (DoRA's per-column norms).

    Returns:
      The merged tree, or ``(merged, aux)`` when ``return_aux``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((4, 3), jnp.bfloat16)}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> adapters.merge(a, params, *s)["w"].dtype
      dtype(bfloat16)
    """
    merged = _apply_all(assignment, params, trainable, frozen, "merge",
                        check_dropout=False, deterministic=True)
    if not return_aux:
        return merged
    flat = _paths.leaves_by_path(params)
    aux = {
        p: a.merge_aux(flat[p], trainable[p], frozen[p])
        for p, a in assignment.items()
        if a.merge_aux is not None
    }
    return merged, aux


def unmerge(
    assignment: dict[str, Adapter],
    merged: PyTree,
    trainable: dict[str, Any],
    frozen: dict[str, Any],
    *,
    aux: dict[str, Any] | None = None,
) -> PyTree:
    """Removes merged adapters from the weights, where that is exact.

    Exact for LoRA, rsLoRA, LoRA-XS and scale-shift with non-zero scales; DoRA
    needs the ``aux`` norms that ``merge(..., return_aux=True)`` returned.

    Args:
      assignment: ``{path: Adapter}``.
      merged: the merged tree.
      trainable: ``AdapterState.trainable``.
      frozen: ``AdapterState.frozen``.
      aux: ``{path: aux}`` from ``merge(..., return_aux=True)``.

    Returns:
      The base tree (within the dtype's rounding).

    Raises:
      TypeError: for an adapter with no exact inverse, or DoRA without ``aux``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((4, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> m = adapters.merge(a, params, *s)
      >>> bool((adapters.unmerge(a, m, *s)["w"] == params["w"]).all())
      True
    """
    flat = _paths.leaves_by_path(merged)
    _check_assignment(assignment, flat, "unmerge")
    _check_state(assignment, flat, trainable, frozen, "unmerge")
    bias_of = _bias_targets(assignment, flat)
    aux = aux or {}
    for path, adapter in assignment.items():
        if adapter.unapply is None:
            raise TypeError(
                f"unmerge: {adapter!r} on {path!r} has no exact inverse; keep the "
                "base weights instead of unmerging"
            )
        if adapter.merge_aux is not None and path not in aux:
            raise TypeError(
                f"unmerge: {adapter!r} on {path!r} needs the aux that "
                "merge(..., return_aux=True) returned (e.g. DoRA's column norms)"
            )
        if adapter.bias is not None and _sibling(path, adapter.bias.name) in bias_of:
            if adapter.bias.unapply is None:
                raise TypeError(
                    f"unmerge: the bias reparametrisation of {adapter!r} on "
                    f"{path!r} has no exact inverse"
                )

    def one(path: str, w: Any) -> Any:
        if path in assignment:
            a = assignment[path]
            return a.unapply(w, trainable[path], frozen[path], aux.get(path))
        if path in bias_of:
            k = bias_of[path]
            hook = assignment[k].bias
            return hook.unapply(np.shape(flat[k]), w, trainable[k], frozen[k])
        return w

    return _paths.map_with_path(one, merged)


def num_trainable(trainable: PyTree) -> int:
    """Counts the scalars in a trainable pytree.

    Args:
      trainable: e.g. ``AdapterState.trainable``.

    Returns:
      The number of trainable parameters.

    Example:
      >>> import jax.numpy as jnp
      >>> num_trainable({"w": (jnp.ones((4, 2)), jnp.ones((2, 3)))})
      14
    """
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(trainable))


def compute_dtype(*dtypes: Any) -> np.dtype:
    """Returns the wider of floating dtypes without implicit promotion.

    Works under ``jax_numpy_dtype_promotion="strict"``: the widest itemsize
    wins; bfloat16 with float16 gives float32.

    Args:
      *dtypes: floating dtypes.

    Returns:
      The dtype to compute in.

    Example:
      >>> import jax.numpy as jnp
      >>> compute_dtype(jnp.bfloat16, jnp.float32)
      dtype('float32')
    """
    ds = [jnp.dtype(d) for d in dtypes]
    widest = max(ds, key=lambda d: d.itemsize)
    same = {d for d in ds if d.itemsize == widest.itemsize}
    if len(same) > 1:
        return jnp.dtype(jnp.float32) if widest.itemsize < 4 else widest
    return widest
