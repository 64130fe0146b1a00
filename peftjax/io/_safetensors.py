# SPDX-License-Identifier: Apache-2.0
"""Safetensors reading and writing: named numpy arrays plus string metadata.

A format-level reader with no knowledge of any model: it returns the arrays a
file (or a sharded checkpoint described by a ``*.safetensors.index.json``)
holds, keyed by their tensor names, in the dtype stored on disk (bf16 through
``ml_dtypes``). Never unpickles anything.

Exports: ``read_safetensors``, ``read_safetensors_index``, ``write_safetensors``.
"""

import os
from collections.abc import Iterable, Mapping

import numpy as np

from peftjax.io import _json


def _require_file(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what}: no such file {path!r}")
    return path


def read_safetensors(
    path: str | os.PathLike,
    *,
    names: Iterable[str] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads tensors and the string metadata of one ``.safetensors`` file.

    Args:
      path: the file.
      names: if given, read only these tensors (a missing name is an error).

    Returns:
      ``(arrays, metadata)``: ``{name: np.ndarray}`` in the stored dtype and
      torch layout (whatever the writer used), and the header's
      ``__metadata__`` dict (empty if absent).

    Raises:
      ValueError: the file does not exist, is not a safetensors file, or lacks
        a requested name.

    Example:
      >>> import numpy as np, tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "x.safetensors")
      >>> write_safetensors(p, {"w": np.ones((2, 3), np.float32)})
      >>> read_safetensors(p)[0]["w"].shape
      (2, 3)
    """
    from safetensors import SafetensorError, safe_open

    path = _require_file(path, "read_safetensors")
    try:
        with safe_open(path, framework="numpy") as f:
            stored = list(f.keys())
            metadata = dict(f.metadata() or {})
            wanted = stored if names is None else list(names)
            missing = sorted(set(wanted) - set(stored))
            if missing:
                raise ValueError(
                    f"read_safetensors: {path!r} has no tensor(s) {missing[:5]}; "
                    f"it holds {len(stored)} tensors, e.g. {sorted(stored)[:5]}"
                )
            arrays = {k: f.get_tensor(k) for k in wanted}
    except SafetensorError as e:
        raise ValueError(
            f"read_safetensors: {path!r} is not a readable safetensors file: {e}"
        ) from e
    return arrays, metadata


def read_safetensors_index(
    index_path: str | os.PathLike,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a sharded checkpoint through its ``model.safetensors.index.json``.

    Args:
      index_path: the index file; its ``weight_map`` maps tensor names to
        shard file names relative to the index's directory.

    Returns:
      ``(arrays, metadata)`` as :func:`read_safetensors`, merged over shards;
      ``metadata`` is the index's ``metadata`` dict with values as strings.

    Raises:
      ValueError: a missing index or shard, a malformed index, or a tensor
        listed for one shard but stored in none.

    Example:
      >>> import numpy as np, tempfile, os, json
      >>> d = tempfile.mkdtemp()
      >>> write_safetensors(os.path.join(d, "a.safetensors"), {"x": np.ones(2)})
      >>> write_safetensors(os.path.join(d, "b.safetensors"), {"y": np.zeros(3)})
      >>> idx = {"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}
      >>> with open(os.path.join(d, "i.json"), "w") as f: json.dump(idx, f)
      >>> sorted(read_safetensors_index(os.path.join(d, "i.json"))[0])
      ['x', 'y']
    """
    index_path = _require_file(index_path, "read_safetensors_index")
    index = _json.read_json(index_path, "read_safetensors_index", want_object=False)
    weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise ValueError(
            f"read_safetensors_index: {index_path!r} has no 'weight_map' object"
        )
    root = os.path.dirname(index_path)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(str(shard), []).append(str(name))
    arrays: dict[str, np.ndarray] = {}
    for shard, shard_names in sorted(by_shard.items()):
        shard_path = os.path.join(root, shard)
        if not os.path.isfile(shard_path):
            raise ValueError(
                f"read_safetensors_index: shard {shard!r} listed in "
                f"{index_path!r} (for e.g. {shard_names[0]!r}) does not exist"
            )
        part, _ = read_safetensors(shard_path, names=shard_names)
        arrays.update(part)
    metadata = {str(k): str(v) for k, v in dict(index.get("metadata") or {}).items()}
    return arrays, metadata


def write_safetensors(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes named arrays (and optional string metadata) to a safetensors file.

    Args:
      path: the output file.
      arrays: ``{name: array}``; JAX arrays are copied to host numpy arrays.
      metadata: optional ``{str: str}`` stored in the header.

    Returns:
      ``None``; the file is written.

    Raises:
      TypeError: a metadata value that is not a string.

    Example:
      >>> import numpy as np, tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "x.safetensors")
      >>> write_safetensors(p, {"b": np.arange(3, dtype=np.int32)}, metadata={"k": "v"})
      >>> read_safetensors(p)[1]
      {'k': 'v'}
    """
    from safetensors.numpy import save_file

    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(v, str):
            raise TypeError(
                f"write_safetensors: metadata[{k!r}] must be str, "
                f"got {type(v).__name__}"
            )
    host = {str(k): np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}
    save_file(host, os.fspath(path), metadata=meta or None)
