# SPDX-License-Identifier: Apache-2.0
"""PartitionSpecs of base parameters from the same path rules as everything else.

A rule's payload is a ``jax.sharding.PartitionSpec`` (used as is), a
``MatrixSpec`` (mesh axes for the input, output and batch axes of the leaf's
matrix view, resolved through ``peftjax.tree.DimensionNumbers``, so one rule
covers 2-D ``(in, out)`` kernels, stacked ``(L, in, out)`` kernels and
head-split kernels with explicit dimension numbers) or ``None`` (replicated,
explicitly). Leaves no rule matches are replicated; a rule that matches
nothing is an error, as everywhere in peftjax.

Exports: ``MatrixSpec``, ``transformer_rules``, ``param_specs``,
``param_shardings``, ``named_shardings``, ``sharding_table``.
"""

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from peftjax import tree as _tree

MeshAxes = str | tuple[str, ...] | None


def axes_of(entry: Any) -> tuple[str, ...]:
    """The mesh axis names of one PartitionSpec entry (``None`` -> ``()``)."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def entry_of(axes: tuple[str, ...]) -> Any:
    """The PartitionSpec entry for mesh axis names (``()`` -> ``None``)."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _check_axes(value: Any, name: str) -> MeshAxes:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(a, str) for a in value):
        return tuple(value)
    raise TypeError(
        f"MatrixSpec.{name} must be None, a mesh axis name or a tuple of names, "
        f"got {value!r}"
    )


@dataclasses.dataclass(frozen=True)
class MatrixSpec:
    """Mesh axes for a kernel's matrix view ``(batch..., in, out)``.

    Attributes:
      inputs: mesh axes of the input (reduction) axis; with several reduction
        axes (head-split kernels) they go on the major one.
      outputs: mesh axes of the output axis (the major one if several).
      batch: mesh axes of the first batch axis (stacked layers).
      dimension_numbers: the leaf's matrix view; None for a 2-D ``(in,
        out)`` leaf (``param_specs`` fills in the view of stacked
        ``layers/...`` leaves and of its ``layout``, as ``tree.assign`` does).

    Example:
      >>> from peftjax.tree import dims
      >>> MatrixSpec(inputs="fsdp", outputs="tensor",
      ...            dimension_numbers=dims.stacked()).resolve((30, 576, 1536))
      P(None, 'fsdp', 'tensor')
    """

    inputs: MeshAxes = None
    outputs: MeshAxes = None
    batch: MeshAxes = None
    dimension_numbers: _tree.DimensionNumbers | None = None

    def __post_init__(self):
        for name in ("inputs", "outputs", "batch"):
            object.__setattr__(self, name, _check_axes(getattr(self, name), name))

    def with_dimension_numbers(self, dims: _tree.DimensionNumbers) -> "MatrixSpec":
        """Returns this spec for a leaf viewed through ``dims``.

        Args:
          dims: the leaf's matrix view.

        Returns:
          A copy with ``dimension_numbers=dims``.

        Example:
          >>> from peftjax.tree import dims
          >>> MatrixSpec(inputs="fsdp").with_dimension_numbers(dims.stacked()).resolve(
          ...     (2, 4, 8))
          P(None, 'fsdp', None)
        """
        return dataclasses.replace(self, dimension_numbers=dims)

    def resolve(self, shape: tuple[int, ...], *, path: str = "<leaf>") -> PartitionSpec:
        """Returns the PartitionSpec of a leaf of ``shape``.

        Args:
          shape: the leaf's shape.
          path: used in error messages.

        Returns:
          A ``PartitionSpec`` with one entry per axis.

        Raises:
          ValueError: the leaf has no matrix view (e.g. a 1-D leaf, or rank >= 3
            without ``dimension_numbers``).

        Example:
          >>> MatrixSpec(inputs="fsdp").resolve((4, 8))
          P('fsdp', None)
        """
        if len(shape) < 2:
            raise ValueError(
                f"{path}: MatrixSpec targets matrices, but the leaf has shape "
                f"{tuple(shape)}; give it a PartitionSpec or exclude it with a "
                "`then=None` rule"
            )
        r = _tree.resolve(self.dimension_numbers, shape, path=path)
        entries: list[Any] = [None] * len(shape)
        if r.batch:
            entries[r.batch[0]] = self.batch
        entries[r.reduction[0]] = self.inputs
        entries[r.output[0]] = self.outputs
        return PartitionSpec(*entries)


def transformer_rules(
    *, fsdp: MeshAxes = "fsdp", tensor: MeshAxes = "tensor"
) -> list[_tree.Rule]:
    """Returns FSDP + tensor-parallel rules for transformer kernel names.

    Column-parallel kernels (``q_proj``, ``k_proj``, ``v_proj``,
    ``gate_proj``, ``up_proj``, ``lm_head``, BERT's ``query``, ``key``,
    ``value``, ``intermediate``): input axis on ``fsdp``, output axis on
    ``tensor``. Row-parallel kernels (``o_proj``, ``down_proj``, BERT's
    ``output``): input axis on ``tensor``, output axis on ``fsdp``. Token
    embeddings (``embed_tokens``, ``word_embeddings``): the vocabulary axis on
    ``(tensor, fsdp)``. Norms and biases match nothing and stay replicated.
    With a mesh axis of size 1 the entry is a no-op, so one rule set serves
    data-parallel, FSDP and tensor-parallel meshes.

    Args:
      fsdp: the FSDP mesh axis (or axes).
      tensor: the tensor-parallel mesh axis (or axes).

    Returns:
      A list of ``peftjax.tree.Rule`` with ``MatrixSpec`` payloads; pass
      ``allow_unused=True`` to ``param_shardings`` for models that lack one of
      the three families.

    Example:
      >>> [r.then.inputs for r in transformer_rules()]
      ['fsdp', 'tensor', ('tensor', 'fsdp')]
    """
    both = axes_of(_check_axes(tensor, "tensor")) + axes_of(_check_axes(fsdp, "fsdp"))
    column = (
        r"(.*/)?(q_proj|k_proj|v_proj|gate_proj|up_proj|lm_head|query|key|"
        r"value|intermediate)/kernel"
    )
    row = r"(.*/)?(o_proj|down_proj|output)/kernel"
    embed = r"(.*/)?(embed_tokens|word_embeddings)/embedding"
    return [
        _tree.Rule(where=column, then=MatrixSpec(inputs=fsdp, outputs=tensor)),
        _tree.Rule(where=row, then=MatrixSpec(inputs=tensor, outputs=fsdp)),
        _tree.Rule(where=embed, then=MatrixSpec(inputs=entry_of(both))),
    ]


def _leaf_desc(path: str, leaf: Any) -> str:
    dtype = getattr(leaf, "dtype", None)
    return f"{path!r} (shape {tuple(np.shape(leaf))}, dtype {dtype})"


def param_specs(params: Any, rules: Any, *, allow_unused: bool = False,
                layout: Any = None) -> Any:
    """Returns a tree of ``PartitionSpec`` for ``params`` from path rules.

    Args:
      params: the base parameter tree (arrays or ``ShapeDtypeStruct``).
      rules: ``peftjax.tree.Rule``s whose payloads are ``PartitionSpec``,
        ``MatrixSpec`` or ``None`` (replicated); first match wins; unmatched
        leaves are replicated.
      allow_unused: if False (default), a rule that matches nothing raises.
      layout: the tree's ``peftjax.tree.Layout`` (stacked containers and
        kernel views) for ``MatrixSpec`` payloads, as in ``tree.assign``.

    Returns:
      A tree shaped like ``params`` with a ``PartitionSpec`` per leaf.

    Raises:
      ValueError: an unused rule, a spec longer than the leaf's rank, a
        ``MatrixSpec`` on a leaf without a matrix view (naming path, shape
        and dtype).
      TypeError: a payload of another type.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax.tree import Rule
      >>> p = {"w": jnp.ones((4, 8)), "b": jnp.ones(8)}
      >>> param_specs(p, [Rule(where="w", then=MatrixSpec(outputs="tensor"))])
      {'b': P(), 'w': P(None, 'tensor')}
    """
    chosen = _tree.assign(params, rules, allow_unused=allow_unused, layout=layout)

    def one(path: str, leaf: Any) -> PartitionSpec:
        payload = chosen.get(path)
        shape = tuple(np.shape(leaf))
        if payload is None:
            return PartitionSpec()
        if isinstance(payload, MatrixSpec):
            try:
                return payload.resolve(shape, path=path)
            except ValueError as e:
                raise ValueError(
                    f"param_specs: {_leaf_desc(path, leaf)}: {e}"
                ) from None
        if isinstance(payload, PartitionSpec):
            if len(payload) > len(shape):
                raise ValueError(
                    f"param_specs: {_leaf_desc(path, leaf)} has rank {len(shape)} but "
                    f"its rule gives the longer spec {payload}"
                )
            return payload
        raise TypeError(
            f"param_specs: the rule matching {_leaf_desc(path, leaf)} has payload "
            f"{payload!r} of type {type(payload).__name__}; use a PartitionSpec, a "
            "peftjax.shard.MatrixSpec or None"
        )

    return _tree.map_with_path(one, params)


def check_spec(
    mesh: Any, spec: PartitionSpec, shape: tuple[int, ...], what: str
) -> None:
    """Raises a ``ValueError`` naming ``what`` if ``spec`` does not fit ``shape``."""
    sizes = dict(mesh.shape)
    seen: set[str] = set()
    if len(spec) > len(shape):
        raise ValueError(f"{what}: spec {spec} is longer than the rank {len(shape)}")
    for dim, entry in zip(shape, tuple(spec), strict=False):
        names = axes_of(entry)
        for a in names:
            if a not in sizes:
                raise ValueError(
                    f"{what}: spec {spec} names mesh axis {a!r}, but the mesh has "
                    f"axes {tuple(sizes)}"
                )
            if a in seen:
                raise ValueError(f"{what}: spec {spec} uses mesh axis {a!r} twice")
            seen.add(a)
        n = math.prod(sizes[a] for a in names)
        if dim % n:
            raise ValueError(
                f"{what}: spec {spec} splits an axis of size {dim} over {names} "
                f"({n} devices), which does not divide it"
            )


def named_shardings(mesh: Any, tree: Any, specs: Any) -> Any:
    """Turns a tree of ``PartitionSpec`` into ``NamedSharding``s, validating each.

    Args:
      mesh: the mesh (a ``Mesh`` or an ``AbstractMesh``).
      tree: the arrays (or ``ShapeDtypeStruct``s) the specs are for.
      specs: a tree with ``tree``'s structure of ``PartitionSpec``.

    Returns:
      A tree of ``NamedSharding`` with ``tree``'s structure.

    Raises:
      ValueError: an unknown or repeated mesh axis, or an axis size that the
        mesh axes do not divide (naming path, shape, dtype and spec).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from peftjax.shard import make_mesh
      >>> mesh = make_mesh(devices=jax.devices()[:1])
      >>> named_shardings(mesh, {"w": jnp.ones((4, 2))}, {"w": P("fsdp")})["w"].spec
      P('fsdp',)
    """
    flat = _tree.flatten(tree)
    spec_flat = _tree.flatten(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    if [p for p, _ in flat] != [p for p, _ in spec_flat]:
        raise ValueError(
            "named_shardings: specs do not have the tree's paths: "
            f"{[p for p, _ in flat][:5]} vs {[p for p, _ in spec_flat][:5]}"
        )
    by_path = dict(spec_flat)

    def one(path: str, leaf: Any) -> NamedSharding:
        spec = by_path[path]
        if not isinstance(spec, PartitionSpec):
            raise TypeError(
                f"named_shardings: {path!r} has {spec!r}, not a PartitionSpec"
            )
        check_spec(mesh, spec, tuple(np.shape(leaf)), f"{_leaf_desc(path, leaf)}")
        return NamedSharding(mesh, spec)

    return _tree.map_with_path(one, tree)


def param_shardings(
    mesh: Any, params: Any, rules: Any, *, allow_unused: bool = False,
    layout: Any = None,
) -> Any:
    """Returns a tree of ``NamedSharding`` for ``params`` from path rules.

    ``named_shardings(mesh, params, param_specs(params, rules))``: place the
    base with ``jax.device_put(params, shardings)`` and pass the same tree to
    ``jax.jit(in_shardings=...)``.

    Args:
      mesh: the mesh (e.g. ``make_mesh(fsdp=8)``).
      params: the base parameter tree.
      rules: rules with ``PartitionSpec`` / ``MatrixSpec`` / ``None`` payloads
        (``transformer_rules()`` for Llama/BERT-style names).
      allow_unused: forwarded to ``param_specs``.
      layout: forwarded to ``param_specs``.

    Returns:
      A tree shaped like ``params`` of ``NamedSharding``.

    Raises:
      ValueError: as ``param_specs`` and ``named_shardings``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax.shard import make_mesh
      >>> from peftjax.tree import Rule
      >>> mesh = make_mesh(devices=jax.devices()[:1])
      >>> sh = param_shardings(mesh, {"w": jnp.ones((4, 2))},
      ...                      [Rule(where="w", then=MatrixSpec(inputs="fsdp"))])
      >>> sh["w"].spec
      P('fsdp', None)
    """
    return named_shardings(
        mesh, params, param_specs(params, rules, allow_unused=allow_unused, layout=layout)
    )


def spec_of(x: Any) -> PartitionSpec:
    """The ``PartitionSpec`` of a ``NamedSharding``, a spec, or None (replicated)."""
    if x is None:
        return PartitionSpec()
    if isinstance(x, PartitionSpec):
        return x
    if isinstance(x, NamedSharding):
        return x.spec
    raise TypeError(
        f"expected a NamedSharding or a PartitionSpec, got {type(x).__name__}"
    )


def sharding_table(tree: Any, shardings: Any) -> str:
    """Returns a table of path, shape, dtype, spec and per-device bytes.

    Args:
      tree: arrays or ``ShapeDtypeStruct``s.
      shardings: a tree with ``tree``'s structure of ``NamedSharding`` (or
        ``PartitionSpec`` with sizes taken as unsplit).

    Returns:
      A printable ``str``, one row per leaf, then the total bytes and the
      per-device bytes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from peftjax.shard import make_mesh
      >>> mesh = make_mesh(devices=jax.devices()[:1])
      >>> t = {"w": jnp.ones((4, 2))}
      >>> print(sharding_table(t, {"w": NamedSharding(mesh, P("fsdp"))}))
      ... # doctest: +NORMALIZE_WHITESPACE
      path  shape   dtype    spec        bytes/device
      w     (4, 2)  float32  P('fsdp',)  32
      1 leaves, 32 bytes, 32 bytes per device
    """
    flat = _tree.flatten(tree)
    sh = dict(
        _tree.flatten(
            shardings, is_leaf=lambda x: isinstance(x, (PartitionSpec, NamedSharding))
        )
    )
    rows = [("path", "shape", "dtype", "spec", "bytes/device")]
    total = per_device = 0
    for path, leaf in flat:
        shape = tuple(np.shape(leaf))
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)  # typed keys: their data
            shape = tuple(leaf.shape)
        dtype = np.dtype(leaf.dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        s = sh.get(path)
        split = 1
        if isinstance(s, NamedSharding):
            sizes = dict(s.mesh.shape)
            split = math.prod(sizes[a] for e in tuple(s.spec) for a in axes_of(e))
        total += nbytes
        per_device += nbytes // split
        rows.append(
            (path, str(shape), dtype.name, repr(spec_of(s)), str(nbytes // split))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    lines.append(
        f"{len(flat)} leaves, {total:,} bytes, {per_device:,} bytes per device"
    )
    return "\n".join(lines)
