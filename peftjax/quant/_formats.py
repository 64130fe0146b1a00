# SPDX-License-Identifier: Apache-2.0
"""Block quantisation formats: int8 / int4 / NF4 through qwix, GGUF Q8_0 / Q4_1 our own.

A ``QuantFormat`` says how one axis of an array (the *blocked axis*, by default
the input axis ``-2`` of a Flax kernel ``(..., in, out)``) is cut into blocks
of ``block_size`` consecutive values and how each block is stored. Its
``encode`` maps float blocks ``(..., nb, block_size)`` to a pytree of arrays
whose leaves all start with the block-grid shape ``(..., nb)``; ``decode`` is
the inverse up to rounding, returning float32 blocks. Because every stored
leaf starts with the block grid, slicing any non-blocked axis (a layer of a
stacked kernel, a range of output columns, rows of an embedding) is a slice
of every leaf, with no requantisation.

What qwix does for us, and what we wrote ourselves:

* ``int8``, ``int4`` and ``nf4`` are qwix's symmetric absmax quantisers
  (``qwix.quantize`` with every axis but the in-block one channelwise, i.e.
  one float32 scale per block) and qwix's ``dequantize``; the NF4 code book
  is qwix's (Dettmers et al., 2023, QLoRA, appendix E,
  https://arxiv.org/abs/2305.14314). The stored leaves are a ``qwix.QArray``.
* ``q8_0`` and ``q4_1`` are llama.cpp's GGUF blocks (``ggml-quants.c``):
  qwix has no float zero point (``Q4_1``'s ``d·q + m``) and no float16 block
  scales, so we store them ourselves, bit for bit as a GGUF file holds them
  (which is what lets the SmolLM2 checkpoint stay as it is on disk), and
  write the encoders after llama.cpp's reference ``quantize_row_*_ref``.
* qwix's ``dot_general`` dequantises a whole kernel before the matmul when the
  activation is float; on XLA:CPU that is a kernel-sized float temporary. The
  column-tiled dequantise-and-multiply of ``peftjax.quant.matmul`` is ours.

Storage per weight: q8_0 8.5 bits; q4_1 5 bits; int8 ``8 + 32/block_size``;
int4 and nf4 ``4 + 32/block_size`` (int4/uint4 are packed two per byte on the
device).

Exports: ``QuantFormat``, ``Q8_0Blocks``, ``Q4_1Blocks``, ``int8``, ``int4``,
``nf4``, ``q8_0``, ``q4_1``, ``gguf_blocks``.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class QuantFormat(NamedTuple):
    """A block quantisation format (static configuration; compare by value).

    Attributes:
      name: the format's name (``"nf4"``, ``"q4_1"``, ...).
      block_size: values per block along the blocked axis.
      axis: the blocked axis (``-2``: the input axis of a Flax kernel;
        ``-1`` for an embedding table ``(vocab, d)`` used by a tied head).
      encode: ``float32 (..., nb, block_size) -> blocks`` (a pytree whose
        leaves all start with ``(..., nb)``).
      decode: ``blocks -> float32 (..., nb, block_size)``.
      grid: ``blocks -> (..., nb)``, the block-grid shape.
      bits: storage bits per weight, scales included.

    Example:
      >>> q4_1().bits, nf4(block_size=64).bits
      (5.0, 4.5)
    """

    name: str
    block_size: int
    axis: int
    encode: Callable[[jax.Array], Any]
    decode: Callable[[Any], jax.Array]
    grid: Callable[[Any], tuple[int, ...]]
    bits: float

    def __repr__(self) -> str:
        return f"{self.name}(block_size={self.block_size}, axis={self.axis})"


class Q8_0Blocks(NamedTuple):
    """GGUF Q8_0 blocks of 32: ``w = d·q``.

    Attributes:
      d: ``(..., nb)`` float16 block scales.
      qs: ``(..., nb, 32)`` int8 values.
    """

    d: jax.Array
    qs: jax.Array


class Q4_1Blocks(NamedTuple):
    """GGUF Q4_1 blocks of 32: ``w = d·q + m`` with ``q`` in ``0..15``.

    Attributes:
      d: ``(..., nb)`` float16 block scales.
      m: ``(..., nb)`` float16 block minima.
      qs: ``(..., nb, 16)`` uint8; byte ``j`` holds value ``j`` in its low
        nibble and value ``j + 16`` in its high nibble (GGUF's order).
    """

    d: jax.Array
    m: jax.Array
    qs: jax.Array


def _check(name: str, block_size: int, axis: int) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or (
            block_size < 1):
        raise ValueError(
            f"{name}: block_size must be a positive int, got {block_size!r}")
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"{name}: axis must be an int, got {axis!r}")


# -- GGUF Q8_0 (llama.cpp quantize_row_q8_0_ref) ---------------------------------
def _roundf(v: jax.Array) -> jax.Array:
    """C ``roundf`` (half away from zero), as ggml and gguf-py compute it."""
    a = jnp.abs(v)
    fl = jnp.floor(a)
    return jnp.sign(v) * (fl + jnp.floor(2 * (a - fl)))


def _inverse(d: jax.Array) -> jax.Array:
    """``1/d``, and 0 where ``d == 0`` (as ggml: a zero block stays zero)."""
    safe = jnp.where(d == 0, jnp.ones_like(d), d)
    return jnp.where(d == 0, jnp.zeros_like(d), 1 / safe)


def _q8_0_encode(x: jax.Array) -> Q8_0Blocks:
    d = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / jnp.float32(127)
    inv = _inverse(d)
    qs = _roundf(x * inv).astype(jnp.int8)
    return Q8_0Blocks(d=d[..., 0].astype(jnp.float16), qs=qs)


def _q8_0_decode(b: Q8_0Blocks) -> jax.Array:
    return b.d.astype(jnp.float32)[..., None] * b.qs.astype(jnp.float32)


def _gguf_grid(b: Any) -> tuple[int, ...]:
    return tuple(b.d.shape)


# -- GGUF Q4_1 (llama.cpp quantize_row_q4_1_ref) ---------------------------------
def _q4_1_encode(x: jax.Array) -> Q4_1Blocks:
    lo = jnp.min(x, axis=-1, keepdims=True)
    hi = jnp.max(x, axis=-1, keepdims=True)
    d = (hi - lo) / jnp.float32(15)
    inv = _inverse(d)
    q = jnp.trunc((x - lo) * inv + jnp.float32(0.5))
    q = jnp.clip(q, 0, 15).astype(jnp.uint8)
    half = x.shape[-1] // 2
    qs = q[..., :half] | (q[..., half:] << jnp.uint8(4))
    return Q4_1Blocks(d=d[..., 0].astype(jnp.float16), m=lo[..., 0].astype(jnp.float16),
                      qs=qs)


def _q4_1_decode(b: Q4_1Blocks) -> jax.Array:
    q = jnp.concatenate([b.qs & jnp.uint8(15), b.qs >> jnp.uint8(4)], axis=-1)
    return (b.d.astype(jnp.float32)[..., None] * q.astype(jnp.float32)
            + b.m.astype(jnp.float32)[..., None])


# -- qwix: int8 / int4 / nf4 -------------------------------------------------------
def _qwix_encode(x: jax.Array, qtype: Any) -> Any:
    import qwix

    return qwix.quantize(x.astype(jnp.float32), qtype,
                         channelwise_axes=tuple(range(x.ndim - 1)))


def _qwix_decode(b: Any) -> jax.Array:
    import qwix

    b = dataclasses.replace(b, scale=b.scale.astype(jnp.float32))
    return qwix.dequantize(b)


def _qwix_grid(b: Any) -> tuple[int, ...]:
    return tuple(b.scale.shape[:-1])


# Module-level functions (not closures) so that equal formats compare equal.
def _int8_encode(x: jax.Array) -> Any:
    return _qwix_encode(x, jnp.int8)


def _int4_encode(x: jax.Array) -> Any:
    return _qwix_encode(x, jnp.int4)


def _nf4_encode(x: jax.Array) -> Any:
    return _qwix_encode(x, "nf4")


def int8(*, block_size: int = 64, axis: int = -2) -> QuantFormat:
    """Symmetric absmax int8 blocks (qwix): ``w ≈ s·q``, ``s = max|w|/127.5``.

    Round trip error per value: at most ``s/2 = max|w_block|/255``.

    Args:
      block_size: values per block (one float32 scale each).
      axis: the blocked axis (the contraction axis of the matmul using it).

    Returns:
      The ``QuantFormat`` (``8 + 32/block_size`` bits per weight).

    Example:
      >>> int8(block_size=32).bits
      9.0
    """
    _check("int8", block_size, axis)
    return QuantFormat("int8", block_size, axis, _int8_encode, _qwix_decode,
                       _qwix_grid, 8 + 32 / block_size)


def int4(*, block_size: int = 64, axis: int = -2) -> QuantFormat:
    """Symmetric absmax int4 blocks (qwix): ``w ≈ s·q``, ``s = max|w|/7.5``.

    Round trip error per value: at most ``s/2 = max|w_block|/15``.

    Args:
      block_size: values per block (one float32 scale each).
      axis: the blocked axis.

    Returns:
      The ``QuantFormat`` (``4 + 32/block_size`` bits per weight).

    Example:
      >>> int4().name
      'int4'
    """
    _check("int4", block_size, axis)
    return QuantFormat("int4", block_size, axis, _int4_encode, _qwix_decode,
                       _qwix_grid, 4 + 32 / block_size)


def nf4(*, block_size: int = 64, axis: int = -2) -> QuantFormat:
    """NormalFloat4 blocks (qwix; QLoRA): ``w ≈ max|w_block|·c[q]``, 16 code values.

    Round trip error per value: at most ``max|w_block|`` times half the
    widest gap of the code book (``(1 - 0.6962)/2 ≈ 0.152``).

    Args:
      block_size: values per block (64 in QLoRA; one float32 scale each).
      axis: the blocked axis.

    Returns:
      The ``QuantFormat`` (``4 + 32/block_size`` bits per weight).

    References:
      Dettmers et al., 2023, https://arxiv.org/abs/2305.14314

    Example:
      >>> nf4()
      nf4(block_size=64, axis=-2)
    """
    _check("nf4", block_size, axis)
    return QuantFormat("nf4", block_size, axis, _nf4_encode, _qwix_decode,
                       _qwix_grid, 4 + 32 / block_size)


def q8_0(*, axis: int = -2) -> QuantFormat:
    """GGUF Q8_0: blocks of 32, ``w = d·q`` with float16 ``d = max|w|/127``.

    Round trip error per value: at most ``d/2 + 127·|d - fp16(d)|``.

    Args:
      axis: the blocked axis (GGUF blocks run along a tensor's rows, i.e. the
        input axis of a linear weight and the feature axis of an embedding).

    Returns:
      The ``QuantFormat`` (8.5 bits per weight).

    Example:
      >>> q8_0(axis=-1)
      q8_0(block_size=32, axis=-1)
    """
    _check("q8_0", 32, axis)
    return QuantFormat("q8_0", 32, axis, _q8_0_encode, _q8_0_decode, _gguf_grid, 8.5)


def q4_1(*, axis: int = -2) -> QuantFormat:
    """GGUF Q4_1: blocks of 32, ``w = d·q + m``, ``q`` in ``0..15``, float16 ``d, m``.

    ``d = (max - min)/15`` and ``m = min`` per block. Round trip error per
    value: at most ``d/2 + 15·|d - fp16(d)| + |m - fp16(m)|``.

    Args:
      axis: the blocked axis.

    Returns:
      The ``QuantFormat`` (5 bits per weight).

    Example:
      >>> q4_1().block_size
      32
    """
    _check("q4_1", 32, axis)
    return QuantFormat("q4_1", 32, axis, _q4_1_encode, _q4_1_decode, _gguf_grid, 5.0)


def gguf_blocks(fmt: QuantFormat, raw: np.ndarray) -> Any:
    """Splits a GGUF tensor's raw bytes ``(rows, nb·type_size)`` into blocks.

    Args:
      fmt: ``q8_0()`` or ``q4_1()``.
      raw: the tensor's bytes as stored (uint8), one row per leading index.

    Returns:
      ``Q8_0Blocks`` or ``Q4_1Blocks`` (numpy arrays, same bits), with a
      ``QuantizedArray(blocks, fmt, dtype)`` of the tensor's logical shape.

    Raises:
      ValueError: ``fmt`` is neither format, or the last axis of ``raw`` is not
        a whole number of blocks (34 bytes for Q8_0, 20 for Q4_1).

    Example:
      >>> raw = np.zeros((2, 34), np.uint8)
      >>> gguf_blocks(q8_0(), raw).qs.shape
      (2, 1, 32)
    """
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    size = {"q8_0": 34, "q4_1": 20}.get(fmt.name)
    if size is None or raw.ndim < 1 or raw.shape[-1] % size:
        raise ValueError(f"gguf_blocks: cannot split bytes of shape {raw.shape} "
                         f"(dtype {raw.dtype}) into {fmt!r} blocks")
    b = raw.reshape(raw.shape[:-1] + (raw.shape[-1] // size, size))
    if fmt.name == "q8_0":
        return Q8_0Blocks(d=np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0],
                          qs=np.ascontiguousarray(b[..., 2:]).view(np.int8))
    return Q4_1Blocks(d=np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0],
                      m=np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0],
                      qs=np.ascontiguousarray(b[..., 4:]))
