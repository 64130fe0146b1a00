# SPDX-License-Identifier: Apache-2.0
"""``QuantizedArray``: a frozen float array kept as quantised blocks.

A ``QuantizedArray`` stands for a float array of a *logical* shape and dtype
(a Flax kernel ``(in, out)``, a stacked kernel ``(L, in, out)``, an embedding
table ``(V, d)``) stored as the blocks of a ``QuantFormat`` along one axis. It
is a pytree whose leaves are the stored blocks (so ``jit`` takes it as an
argument and ``peftjax.tree.stack_layers`` stacks it), and its logical shape is
derived from the blocks: the blocks' leaves start with the logical shape
without the blocked axis, then the number of blocks. Nothing but
``dequantize`` (and the factored path of ``peftjax.factored``, which dequantises a
tile at a time inside each matmul) turns it back into floats.

Exports: ``QuantizedArray``, ``quantize``, ``dequantize``, ``quantize_params``,
``abstract``, ``is_quantized``, ``nbytes``.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.quant import _formats


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
    """A float array stored as quantised blocks (see module doc).

    Attributes:
      blocks: the format's block pytree; every leaf starts with
        ``shape`` without the blocked axis, then the number of blocks.
      format: the ``QuantFormat`` (its ``axis`` is negative).
      dtype: the logical (dequantised) float dtype.
      shape: the logical shape (derived from ``blocks``).

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize(jnp.ones((64, 3)), _formats.int8(block_size=32))
      >>> q.shape, q.dtype, q.format
      ((64, 3), dtype('float32'), int8(block_size=32, axis=-2))
    """

    __slots__ = ("blocks", "format", "dtype")

    def __init__(self, blocks: Any, format: _formats.QuantFormat, dtype: Any):
        # No validation: jax rebuilds pytrees with placeholder leaves.
        self.blocks, self.format, self.dtype = blocks, format, np.dtype(dtype)

    def tree_flatten_with_keys(self):
        return [(jax.tree_util.GetAttrKey("blocks"), self.blocks)], (self.format,
                                                                    self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        grid = tuple(self.format.grid(self.blocks))
        rest, nb = grid[:-1], grid[-1]
        k = len(rest) + 1 + self.format.axis
        return rest[:k] + (nb * self.format.block_size,) + rest[k:]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def axis(self) -> int:
        """The blocked axis as a non-negative index."""
        return self.ndim + self.format.axis

    def __repr__(self) -> str:
        return (f"QuantizedArray(shape={self.shape}, dtype={self.dtype.name}, "
                f"format={self.format!r})")


def is_quantized(x: Any) -> bool:
    """Returns whether ``x`` is a :class:`QuantizedArray`.

    Args:
      x: anything.

    Returns:
      True for a ``QuantizedArray``.

    Example:
      >>> import jax.numpy as jnp
      >>> is_quantized(jnp.ones(2))
      False
    """
    return isinstance(x, QuantizedArray)


def quantize(w: Any, fmt: _formats.QuantFormat) -> QuantizedArray:
    """Quantises a float array into ``fmt``'s blocks along ``fmt.axis``.

    Args:
      w: a float array (any rank >= 1); its size along ``fmt.axis`` must be a
        multiple of ``fmt.block_size``.
      fmt: a ``QuantFormat`` (``int8()``, ``int4()``, ``nf4()``, ``q8_0()``,
        ``q4_1()``).

    Returns:
      The ``QuantizedArray`` (logical shape and dtype of ``w``).

    Raises:
      TypeError: ``fmt`` is not a ``QuantFormat`` or ``w`` is not float.
      ValueError: the blocked axis is out of range or not a multiple of the
        block size (naming shape, dtype, axis and block size).

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize(jnp.full((32, 2), 0.5), _formats.nf4(block_size=32))
      >>> dequantize(q)[0]
      Array([0.5, 0.5], dtype=float32)
    """
    if not isinstance(fmt, _formats.QuantFormat):
        raise TypeError(f"quantize: fmt must be a QuantFormat, got {fmt!r}")
    shape, dtype = tuple(np.shape(w)), np.dtype(w.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"quantize: w (shape {shape}) must be float, got {dtype}")
    if not -len(shape) <= fmt.axis < len(shape):
        raise ValueError(f"quantize: axis {fmt.axis} of {fmt!r} is out of range for "
                         f"w of shape {shape} ({dtype})")
    k = fmt.axis % len(shape)
    if shape[k] % fmt.block_size:
        raise ValueError(
            f"quantize: w of shape {shape} ({dtype}) has {shape[k]} values along "
            f"axis {k}, not a multiple of {fmt!r}'s block size {fmt.block_size}")
    blocks = _encode_jit(jnp.asarray(w), fmt._replace(axis=k - len(shape)))
    return QuantizedArray(blocks, fmt._replace(axis=k - len(shape)), dtype)


def from_codes(codes: Any, scales: Any, fmt: _formats.QuantFormat, dtype: Any
               ) -> QuantizedArray:
    """A 2-D ``int4``/``int8`` ``QuantizedArray`` from given integers and step sizes.

    For quantisers that choose their own integers (quantisation-aware
    training such as ``adapters.l4q``): ``dequantize`` of the result is
    exactly ``codes * scales`` per block, no re-rounding.

    Args:
      codes: integers ``(nb, block_size, out)`` of an ``(nb·block_size, out)``
        matrix blocked along its first axis, within the format's range
        (``[-8, 7]`` for int4, ``[-128, 127]`` for int8).
      scales: float step sizes ``(nb, out)``, one per block and column.
      fmt: ``int4(block_size=...)`` or ``int8(block_size=...)`` with
        ``axis=-2`` and ``block_size`` equal to ``codes.shape[1]``.
      dtype: the logical float dtype.

    Returns:
      The ``QuantizedArray`` of shape ``(nb·block_size, out)``.

    Raises:
      ValueError: another format or axis, mismatched shapes, codes out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> q = from_codes(jnp.array([[[1], [-2]]]), jnp.array([[0.5]]),
      ...                _formats.int4(block_size=2), jnp.float32)
      >>> dequantize(q).ravel().tolist()
      [0.5, -1.0]
    """
    import qwix

    name = fmt.name if isinstance(fmt, _formats.QuantFormat) else None
    if name not in ("int4", "int8") or fmt.axis != -2:
        raise ValueError(f"from_codes: fmt must be int4 or int8 blocked along axis -2, "
                         f"got {fmt!r}")
    codes, scales = jnp.asarray(codes), jnp.asarray(scales)
    if codes.ndim != 3 or codes.shape[1] != fmt.block_size or scales.shape != (
            codes.shape[0], codes.shape[2]):
        raise ValueError(f"from_codes: codes {codes.shape} must be (nb, {fmt.block_size}, "
                         f"out) and scales (nb, out), got scales {scales.shape}")
    lo, hi = (-8, 7) if name == "int4" else (-128, 127)
    if not isinstance(codes, jax.core.Tracer) and (
            int(jnp.min(codes)) < lo or int(jnp.max(codes)) > hi):
        raise ValueError(f"from_codes: codes outside [{lo}, {hi}] for {fmt!r}")
    qtype = jnp.int4 if name == "int4" else jnp.int8
    # peftjax.quant's qwix blocks: (out, nb, block_size) values, (out, nb, 1) scales
    blocks = qwix.QArray(qvalue=jnp.transpose(codes, (2, 0, 1)).astype(qtype),
                         scale=jnp.transpose(scales).astype(jnp.float32)[:, :, None],
                         zero_point=None, qtype=qtype)
    return QuantizedArray(blocks, fmt, dtype)


@functools.partial(jax.jit, static_argnums=1)
def _encode_jit(w: jax.Array, fmt: _formats.QuantFormat) -> Any:
    k = w.ndim + fmt.axis
    x = jnp.moveaxis(w.astype(jnp.float32), k, -1)
    x = x.reshape(x.shape[:-1] + (x.shape[-1] // fmt.block_size, fmt.block_size))
    return fmt.encode(x)


@jax.jit
def _dequantize_one(q: QuantizedArray) -> jax.Array:
    grid = tuple(q.format.grid(q.blocks))
    x = q.format.decode(q.blocks)
    x = x.reshape(grid[:-1] + (grid[-1] * q.format.block_size,))
    return jnp.moveaxis(x, -1, q.axis).astype(q.dtype)


def dequantize(tree: Any) -> Any:
    """Dequantises every ``QuantizedArray`` in ``tree`` (or one array).

    This forms the float arrays: use it for inits that need the weights
    (DoRA's magnitude, LoRA-XS's SVD) or for a float reference, not inside a
    training step (``peftjax.factored`` dequantises a tile at a time there).

    Args:
      tree: a ``QuantizedArray`` or a pytree containing some.

    Returns:
      The same structure with float arrays of the logical shapes and dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"w": quantize(jnp.ones((64, 2)), _formats.nf4()), "b": jnp.zeros(2)}
      >>> dequantize(t)["w"].shape
      (64, 2)
    """
    return jax.tree.map(lambda x: _dequantize_one(x) if is_quantized(x) else x, tree,
                        is_leaf=is_quantized)


def abstract(tree: Any) -> Any:
    """Replaces each ``QuantizedArray`` by a ``ShapeDtypeStruct`` of its logical shape.

    For targeting and shape-only inits on a quantised tree:
    ``tree.assign(abstract(params), rules)``, ``adapters.init(a, key,
    abstract(params))`` (LoRA, which only needs shapes).

    Args:
      tree: a pytree that may contain ``QuantizedArray`` leaves.

    Returns:
      The same structure, quantised leaves replaced.

    Example:
      >>> import jax.numpy as jnp
      >>> abstract({"w": quantize(jnp.ones((32, 2)), _formats.q4_1())})["w"].shape
      (32, 2)
    """
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        tree, is_leaf=is_quantized)


def quantize_params(params: Any, rules: Any, *, allow_unused: bool = False) -> Any:
    """Quantises the leaves that ``rules`` give a ``QuantFormat``.

    Args:
      params: a parameter tree of float arrays.
      rules: ``peftjax.tree.Rule``s whose payload is a ``QuantFormat`` (or
        ``None`` to keep a leaf in float); first match wins.
      allow_unused: forwarded to ``peftjax.tree.assign``.

    Returns:
      The same structure with the selected leaves as ``QuantizedArray``.

    Raises:
      TypeError: a payload that is not a ``QuantFormat``.
      ValueError: an unused rule, or a leaf that cannot be blocked (naming
        its path, shape, dtype and the format).

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax import tree
      >>> p = {"q": {"kernel": jnp.ones((64, 8))}, "norm": jnp.ones(8)}
      >>> qp = quantize_params(p, [tree.Rule(where=r".*kernel", then=_formats.nf4())])
      >>> qp["q"]["kernel"]
      QuantizedArray(shape=(64, 8), dtype=float32, format=nf4(block_size=64, axis=-2))
    """
    assignment = tree.assign(params, rules, allow_unused=allow_unused)
    for path, fmt in assignment.items():
        if not isinstance(fmt, _formats.QuantFormat):
            raise TypeError(f"quantize_params: the rule for {path!r} gives {fmt!r}; "
                            "expected a QuantFormat (or None)")

    def one(path: str, x: Any) -> Any:
        if path not in assignment:
            return x
        try:
            return quantize(x, assignment[path])
        except (TypeError, ValueError) as e:
            raise type(e)(f"quantize_params: {path!r}: {e}") from e

    return tree.map_with_path(one, params)


def _leaf_bytes(x: Any) -> int:
    dt = np.dtype(x.dtype)
    bits = 4 if dt.name in ("int4", "uint4") else 8 * dt.itemsize
    return -(-math.prod(np.shape(x)) * bits // 8)


def nbytes(tree: Any) -> int:
    """Returns the bytes ``tree``'s arrays occupy on the device (4-bit types packed).

    Args:
      tree: a pytree of arrays, ``QuantizedArray``s included.

    Returns:
      The total, counting ``int4``/``uint4`` at half a byte per value.

    Example:
      >>> import jax.numpy as jnp
      >>> nbytes({"w": quantize(jnp.ones((64, 4)), _formats.q4_1())})
      160
    """
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))
