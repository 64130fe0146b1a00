# SPDX-License-Identifier: Apache-2.0
"""GGUF reading through the ``gguf`` package: metadata plus dequantised arrays.

A format-level reader with no knowledge of any model. Quantised tensors (Q4_1,
Q8_0, K-quants, ...) are dequantised with ``gguf.quants.dequantize`` to float32
and then cast to the requested dtype; with ``keep_quantized=True`` the Q8_0
and Q4_1 tensors instead come back as ``peftjax.quant.QuantizedArray`` holding
the file's own blocks, bit for bit (blocked along the last axis, logical dtype
the requested one). Arrays come back in numpy order, i.e. GGUF's dimension
list reversed, which for a linear weight is torch layout ``(out, in)``.
Model-specific fixes (such as undoing llama.cpp's Q/K row permutation) belong
to the model loaders, not here.

Exports: ``GGUFFile``, ``read_gguf``, ``read_gguf_metadata``.
"""

import os
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from peftjax import quant

_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


class GGUFFile(NamedTuple):
    """The contents of a GGUF file.

    Attributes:
      metadata: ``{key: value}`` with Python scalars, strings and lists
        (e.g. ``"llama.block_count": 30``, ``"tokenizer.ggml.tokens": [...]``).
      tensors: ``{name: array}`` dequantised (or ``QuantizedArray`` for Q8_0 /
        Q4_1 tensors read with ``keep_quantized=True``), shape = GGUF dims
        reversed.
      tensor_types: ``{name: quantisation type name}`` as stored (``"Q4_1"``).

    Example:
      >>> import numpy as np
      >>> f = GGUFFile({"general.architecture": "llama"}, {"w": np.zeros((2, 3))},
      ...              {"w": "F32"})
      >>> f.tensors["w"].shape
      (2, 3)
    """

    metadata: dict[str, Any]
    tensors: dict[str, Any]
    tensor_types: dict[str, str]


def _reader(path: str | os.PathLike, what: str) -> Any:
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what}: no such file {path!r}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{what}: {path!r} is not a readable GGUF file: {e}") from e


def _metadata(reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def _dequantize(tensor: Any, dtype: np.dtype, path: str) -> np.ndarray:
    import gguf

    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(list(tensor.shape)))
    if qtype in (
        gguf.GGMLQuantizationType.F32,
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.F64,
    ):
        data = np.asarray(tensor.data)
    else:
        try:
            data = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
        except NotImplementedError as e:
            raise ValueError(
                f"read_gguf: tensor {tensor.name!r} (shape {shape}) in {path!r} "
                f"has quantisation type {qtype.name}, which the gguf package "
                f"cannot dequantise"
            ) from e
    return np.asarray(data.reshape(shape), dtype=np.float32).astype(dtype, copy=False)


_KEPT = {"Q8_0": quant.q8_0, "Q4_1": quant.q4_1}


def _kept(tensor: Any, dtype: np.dtype) -> quant.QuantizedArray:
    """A Q8_0/Q4_1 tensor as a QuantizedArray of its own blocks (no arithmetic)."""
    fmt = _KEPT[tensor.tensor_type.name](axis=-1)
    shape = tuple(int(d) for d in reversed(list(tensor.shape)))
    raw = np.asarray(tensor.data).reshape(shape[:-1] + (-1,))
    out = quant.QuantizedArray(quant.gguf_blocks(fmt, raw), fmt, dtype)
    if out.shape != shape:
        raise ValueError(f"read_gguf: tensor {tensor.name!r} holds blocks of logical "
                         f"shape {out.shape}, but its header says {shape}")
    return out


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Reads only the key/value metadata of a GGUF file (no tensor data).

    Args:
      path: the ``.gguf`` file.

    Returns:
      ``{key: value}`` as in :class:`GGUFFile`.

    Raises:
      ValueError: a missing or unreadable file.

    Example:
      >>> import gguf, numpy as np, tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "m.gguf")
      >>> w = gguf.GGUFWriter(p, "llama"); w.add_block_count(2)
      >>> w.add_tensor("t", np.ones(4, np.float32))
      >>> w.write_header_to_file(); w.write_kv_data_to_file()
      >>> w.write_tensors_to_file(); w.close()
      >>> read_gguf_metadata(p)["llama.block_count"]
      2
    """
    return _metadata(_reader(path, "read_gguf_metadata"))


def read_gguf(
    path: str | os.PathLike,
    *,
    dtype: Any = np.float32,
    names: Iterable[str] | None = None,
    keep_quantized: bool = False,
) -> GGUFFile:
    """Reads a GGUF file: metadata and every (or the named) tensor, dequantised.

    Args:
      path: the ``.gguf`` file.
      dtype: float dtype of the returned arrays (float32, float16, bfloat16 or
        float64); dequantisation itself runs in float32.
      names: if given, read only these tensors (a missing name is an error).
      keep_quantized: keyword-only; return Q8_0 and Q4_1 tensors as
        ``peftjax.quant.QuantizedArray`` with the file's blocks (logical dtype
        ``dtype``, blocked along the last axis) instead of dequantising them.
        Other quantisation types are still dequantised.

    Returns:
      A :class:`GGUFFile`.

    Raises:
      ValueError: a missing or unreadable file, a missing tensor name, or a
        quantisation type the ``gguf`` package cannot dequantise (the message
        names the tensor, its shape and the type).
      TypeError: a non-float ``dtype``.

    Example:
      >>> import gguf, numpy as np, tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "m.gguf")
      >>> w = gguf.GGUFWriter(p, "llama")
      >>> w.add_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))
      >>> w.write_header_to_file(); w.write_kv_data_to_file()
      >>> w.write_tensors_to_file(); w.close()
      >>> f = read_gguf(p)
      >>> f.tensors["w"].shape, f.tensor_types["w"]
      ((2, 3), 'F32')
    """
    dt = np.dtype(dtype)
    if dt.name not in _FLOAT_DTYPES:
        raise TypeError(f"read_gguf: dtype must be one of {_FLOAT_DTYPES}, got {dt}")
    reader = _reader(path, "read_gguf")
    by_name = {t.name: t for t in reader.tensors}
    wanted = list(by_name) if names is None else list(names)
    missing = sorted(set(wanted) - set(by_name))
    if missing:
        raise ValueError(
            f"read_gguf: {os.fspath(path)!r} has no tensor(s) {missing[:5]}; "
            f"it holds e.g. {sorted(by_name)[:5]}"
        )
    if not isinstance(keep_quantized, bool):
        raise TypeError(
            f"read_gguf: keep_quantized must be a bool, got {keep_quantized!r}")
    tensors = {
        n: _kept(by_name[n], dt)
        if keep_quantized and by_name[n].tensor_type.name in _KEPT
        else _dequantize(by_name[n], dt, os.fspath(path))
        for n in wanted
    }
    types = {n: by_name[n].tensor_type.name for n in wanted}
    return GGUFFile(_metadata(reader), tensors, types)
