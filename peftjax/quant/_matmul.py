# SPDX-License-Identifier: Apache-2.0
"""``x @ dequantize(W)`` a tile of output columns at a time.

Dequantising a whole kernel and then multiplying (what qwix's ``dot_general``
does for a float activation, and what XLA:CPU compiles into a kernel-sized
float temporary) keeps a float copy of the kernel alive for the matmul, and
under ``jax.grad`` autodiff saves it as a residual for the backward pass:
the float model again, one copy per layer. Here the output columns are cut
into tiles of at most ``tile_bytes`` of dequantised weight (and never the
whole kernel): a ``lax.scan`` over the tiles decodes one tile, multiplies and
emits its columns. The tile step is wrapped in ``jax.checkpoint``, so the
backward pass (``dx = dy @ Wᵀ``) decodes each tile again instead of keeping
it: the only float copies of the weight are single tiles, in the forward and
the backward pass.

Exports: ``matmul``, ``tiled_product``, ``DEFAULT_TILE_BYTES``.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.quant import _array, _formats

# The default ``tile_bytes`` of ``matmul`` and of ``peftjax.factored``: at
# most 1 MiB of dequantised weight formed at once.
DEFAULT_TILE_BYTES = 1 << 20


def tile_columns(n_in: int, n_out: int, itemsize: int, tile_bytes: int) -> int:
    """Output columns per tile: within ``tile_bytes``, at most half of them."""
    budget = max(1, tile_bytes // max(1, n_in * itemsize))
    cols = max(1, min(budget, n_out // 2))
    for c in range(cols, max(1, cols // 2) - 1, -1):  # prefer a divisor: no tail
        if n_out % c == 0:
            return c
    return cols


def tiled_product(xm: jax.Array, blocks: Any, fmt: _formats.QuantFormat, dtype: Any,
                  *, tile_bytes: int = DEFAULT_TILE_BYTES, precision: Any = None,
                  preferred_element_type: Any = None) -> jax.Array:
    """Returns ``xm @ W`` for a kernel ``W (in, out)`` given as raw blocks.

    The building block of ``matmul`` for callers that hold a kernel's blocks
    in matrix order themselves (``peftjax.factored`` after regrouping a
    multi-axis kernel): the same tiled product, without a ``QuantizedArray``.

    Args:
      xm: ``(N, in)`` activations.
      blocks: the blocks of ``W`` laid out ``(out, nb, ...)``: one row of
        ``nb`` blocks of ``fmt.block_size`` input values per output column.
      fmt: their ``QuantFormat``.
      dtype: the dtype each dequantised tile is cast to.
      tile_bytes: the most bytes of dequantised weight formed at once.
      precision: forwarded to ``lax.dot_general``.
      preferred_element_type: forwarded to ``lax.dot_general``.

    Returns:
      ``(N, out)``.

    Raises:
      ValueError: the blocks' grid is not ``(out, nb)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax import quant
      >>> w = quant.quantize(jnp.ones((64, 4)), quant.nf4())  # (in, out)
      >>> tuple(w.format.grid(w.blocks))  # (out, nb)
      (4, 1)
      >>> quant.tiled_product(jnp.ones((2, 64)), w.blocks, w.format, w.dtype)[0]
      Array([64., 64., 64., 64.], dtype=float32)
    """
    grid = tuple(fmt.grid(blocks))
    if len(grid) != 2:
        raise ValueError(f"tiled_product: blocks with grid {grid}; expected (out, nb)")
    n_out, n_in = grid[0], grid[1] * fmt.block_size
    dtype = np.dtype(dtype)
    cols = tile_columns(n_in, n_out, dtype.itemsize, tile_bytes)

    def one(x: jax.Array, b: Any) -> jax.Array:
        w = fmt.decode(b)
        w = w.reshape(w.shape[0], n_in).astype(dtype)  # (cols, in)
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=precision,
                                   preferred_element_type=preferred_element_type)

    one = jax.checkpoint(one, prevent_cse=False)
    n = n_out // cols
    main = jax.tree.map(lambda a: a[: n * cols].reshape((n, cols) + a.shape[1:]),
                        blocks)
    _, ys = jax.lax.scan(lambda c, b: (c, one(xm, b)), None, main)
    y = jnp.moveaxis(ys, 0, 1).reshape(xm.shape[0], n * cols)
    if n * cols < n_out:
        tail = jax.tree.map(lambda a: a[n * cols:], blocks)
        y = jnp.concatenate([y, one(xm, tail)], axis=1)
    return y


def matmul(x: jax.Array, w: _array.QuantizedArray, *,
           tile_bytes: int = DEFAULT_TILE_BYTES, precision: Any = None,
           preferred_element_type: Any = None) -> jax.Array:
    """Returns ``x @ dequantize(w)`` without forming the dequantised kernel.

    The product is computed a tile of output columns at a time (see the module
    doc); the gradient with respect to ``x`` decodes each tile again.

    Args:
      x: ``(..., in)`` activations.
      w: a ``QuantizedArray`` of logical shape ``(in, out)`` blocked along
        ``in`` (``axis=-2``, the default of every format).
      tile_bytes: the most bytes of dequantised weight formed at once (a tile
        never spans all output columns).
      precision: forwarded to ``lax.dot_general``.
      preferred_element_type: forwarded to ``lax.dot_general``.

    Returns:
      ``(..., out)``, in the dtype ``lax.dot_general`` gives ``x`` and the
      dequantised ``w``.

    Raises:
      TypeError / ValueError: ``w`` is not a 2-D ``QuantizedArray`` blocked
        along its input axis, or ``x``'s last axis does not match it.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax import quant
      >>> w = quant.quantize(jnp.ones((64, 4)), quant.nf4())
      >>> quant.matmul(jnp.ones((2, 64)), w)[0]
      Array([64., 64., 64., 64.], dtype=float32)
    """
    if not _array.is_quantized(w):
        raise TypeError(f"matmul: w must be a QuantizedArray, got {type(w).__name__}")
    if w.ndim != 2 or w.axis != 0:
        raise ValueError(f"matmul: w of shape {w.shape} ({w.dtype}) is blocked along "
                         f"axis {w.axis}; expected a 2-D (in, out) kernel blocked "
                         "along 0")
    if np.ndim(x) < 1 or np.shape(x)[-1] != w.shape[0]:
        raise ValueError(f"matmul: x of shape {np.shape(x)} ({x.dtype}) does not "
                         f"contract with w of shape {w.shape}")
    lead = tuple(np.shape(x)[:-1])
    xm = x.reshape(math.prod(lead), w.shape[0])
    y = tiled_product(xm, w.blocks, w.format, w.dtype, tile_bytes=tile_bytes,
                      precision=precision,
                      preferred_element_type=preferred_element_type)
    return y.reshape(lead + (w.shape[1],))
