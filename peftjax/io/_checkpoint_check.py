# SPDX-License-Identifier: Apache-2.0
"""Checking a stored checkpoint step before it is restored (``peftjax.io.checkpoint``).

Private: ``checkpoint`` re-exports ``CheckpointError`` and
``CheckpointWarning``. ``check_step`` reads every file a restore reads (the
JSON record, the array store's metadata, index and data files, every stored
value once) and raises ``CheckpointError`` naming the first damaged one. It
writes nothing.
"""

import json
import math
import os
import re
from collections.abc import Callable
from typing import Any, NoReturn

# fail(path, reason) raises CheckpointError for the step being checked
_Fail = Callable[[str, str], NoReturn]

ARRAYS = "arrays"  # the orbax item holding the arrays
META = "meta"  # the orbax item holding the JSON record
META_FILE = os.path.join(META, "metadata")  # where orbax's JsonSave writes it
FORMAT = "peftjax.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint step is damaged: a file is missing, empty, truncated or unreadable.

    A ``ValueError`` (the stored data is invalid), so code that caught the
    ``json.JSONDecodeError`` (itself a ``ValueError``) that a truncated
    record used to raise still catches it.

    Attributes:
      directory: the checkpoint root.
      step: the damaged step.
      path: the damaged file or directory (absolute).
      reason: what is wrong with it.

    Example:
      >>> err = CheckpointError("/ckpt", 3, "/ckpt/3/meta/metadata", "it is empty")
      >>> print(err)
      checkpoint step 3 under '/ckpt' is damaged: /ckpt/3/meta/metadata: it is empty
    """

    def __init__(self, directory: str, step: int, path: str, reason: str):
        self.directory, self.step, self.path, self.reason = directory, step, path, reason
        super().__init__(f"checkpoint step {step} under {directory!r} is damaged: "
                         f"{path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (multiprocessing, pytest-xdist)
        return type(self), (self.directory, self.step, self.path, self.reason)


class CheckpointWarning(UserWarning):
    """``restore(..., fallback=True)`` skipped damaged steps.

    Attributes:
      step: the step that was restored.
      skipped: ``{step: CheckpointError}`` for each damaged newer step.

    Example:
      >>> w = CheckpointWarning("skipped", step=4, skipped={})
      >>> w.step
      4
    """

    def __init__(self, message: str, *, step: int, skipped: dict[int, CheckpointError]):
        super().__init__(message)
        self.step, self.skipped = step, skipped


_TS_FILE = re.compile(r'local file "([^"]+)"')


def error_file(e: Exception) -> str | None:
    """The file a tensorstore error names (the last one), or None."""
    found = _TS_FILE.findall(str(e))
    return found[-1] if found else None


def error_text(e: Exception) -> str:
    """A tensorstore error without its (long) spec dump."""
    return str(e).split(" [tensorstore_spec")[0][:400]


def _read_json(path: str, fail: _Fail) -> Any:
    if not os.path.isfile(path):
        fail(path, "missing" if not os.path.lexists(path) else "not a regular file")
    if os.path.getsize(path) == 0:
        fail(path, "empty (0 bytes)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(path, f"not valid JSON, truncated or overwritten ({e})")
    except OSError as e:
        fail(path, f"unreadable ({e})")


# An OCDBT location: kind, base prefix, file (relative), offset, length.
_LOCATION = re.compile(r"^(btreenode|value):([^:]*):([^:]+):(\d+):(\d+)$")


def _strings(x: Any) -> Any:
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


def _check_store_files(arrays_dir: str, manifest: str, fail: _Fail) -> None:
    """Every file the OCDBT array store refers to (b-tree nodes and the data
    of values stored out of line) exists and holds the bytes referred to.

    Walks the store's index with ``tensorstore.ocdbt.dump``, so a missing,
    empty or cut data file is named (a plain read would not name it).
    """
    import tensorstore as ts

    base = ts.KvStore.open("file://" + arrays_dir + os.sep).result()
    need: dict[str, int] = {}
    todo: list[str | None] = [None]  # None: the manifest
    seen: set[str] = set()
    while todo:
        node = todo.pop()
        where = manifest
        if node is not None:
            m = _LOCATION.match(node)
            where = os.path.join(arrays_dir, m.group(2) + m.group(3)) if m else arrays_dir
        try:
            dump = ts.ocdbt.dump(base, node).result()
        except ValueError as e:
            fail(error_file(e) or where, error_text(e))
        for loc in _strings(dump):
            m = _LOCATION.match(loc)
            if m is None:
                continue
            path = os.path.join(arrays_dir, m.group(2) + m.group(3))
            need[path] = max(need.get(path, 0), int(m.group(4)) + int(m.group(5)))
            if m.group(1) == "btreenode" and loc not in seen:
                seen.add(loc)
                todo.append(loc)
    for path, size in sorted(need.items()):
        if not os.path.isfile(path):
            fail(path, "missing (the array store refers to it)")
        have = os.path.getsize(path)
        if have < size:
            fail(path, "empty (0 bytes)" if have == 0 else
                 f"cut short: {have} bytes, the array store refers to {size}")


def _check_arrays(step_dir: str, records: list[dict[str, Any]], fail: _Fail) -> None:
    """Every stored array is listed, has its shape, and every byte reads back."""
    import tensorstore as ts

    wanted = {f"{i:06d}": r for i, r in enumerate(records)
              if r.get("kind") in ("array", "prng_key")}
    if not wanted:
        return
    arrays_dir = os.path.join(step_dir, ARRAYS)
    if not os.path.isdir(arrays_dir):
        fail(arrays_dir, f"missing; the record lists {len(wanted)} stored arrays")
    tree_meta = _read_json(os.path.join(arrays_dir, "_METADATA"), fail)
    listed = tree_meta.get("tree_metadata", {}) if isinstance(tree_meta, dict) else {}
    absent = sorted(k for k in wanted if f"('{k}',)" not in listed)
    if absent:
        fail(os.path.join(arrays_dir, "_METADATA"),
             f"does not list arrays {absent[:10]} ({len(absent)} of {len(wanted)})")
    meta_dir = os.path.join(arrays_dir, "array_metadatas")
    if os.path.isdir(meta_dir):  # orbax parses these on every restore
        for name in sorted(os.listdir(meta_dir)):
            _read_json(os.path.join(meta_dir, name), fail)
    manifest = os.path.join(arrays_dir, "manifest.ocdbt")
    if not os.path.isfile(manifest):
        fail(manifest, "missing (the index of the array store)")
    _check_store_files(arrays_dir, manifest, fail)
    try:
        kv = ts.KvStore.open({"driver": "ocdbt",
                              "base": "file://" + arrays_dir + os.sep}).result()
        keys = [bytes(k).decode() for k in kv.list().result()]
        reads = {k: kv.read(k) for k in keys}  # every stored byte, read once
        values = {k: r.result() for k, r in reads.items()}
    except ValueError as e:  # tensorstore names the file it could not read
        fail(error_file(e) or arrays_dir, error_text(e))
    for k, v in values.items():
        if not k.endswith("/.zarray") and (v.state != "value" or not len(v.value)):
            fail(arrays_dir, f"the data of array {k.split('/')[0]} (chunk {k}) is "
                             "missing from the array store")
    for k, rec in wanted.items():
        got = values.get(f"{k}/.zarray")
        if got is None or got.state != "value":
            fail(manifest, f"the array store has no array {k} ({rec['path']})")
        try:
            shape = json.loads(bytes(got.value))["shape"]
        except (ValueError, KeyError, TypeError):
            fail(manifest, f"array {k} ({rec['path']}) has no readable header")
        if list(shape) != list(rec["shape"]):
            fail(manifest, f"array {k} ({rec['path']}) has shape {tuple(shape)}, "
                           f"the record says {tuple(rec['shape'])}")
        chunks = [x for x in keys if x.startswith(k + "/") and x != f"{k}/.zarray"]
        if not chunks and math.prod(rec["shape"]) > 0:
            fail(manifest, f"array {k} ({rec['path']}) has no data")


def check_step(root: str, step: int) -> dict[str, Any]:
    """Checks step ``step`` under ``root``; returns its JSON record.

    Reads every file the restore reads (the record, the array store's
    metadata, every byte of the array store) and raises ``CheckpointError``
    for the first damaged one. Writes nothing.
    """

    def fail(path: str, reason: str) -> NoReturn:
        raise CheckpointError(root, step, path, reason)

    step_dir = os.path.join(root, str(step))
    if not os.path.isdir(step_dir):
        fail(step_dir, "the step directory is missing")
    meta = _read_json(os.path.join(step_dir, META_FILE), fail)
    path = os.path.join(step_dir, META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        fail(path, f"not a peftjax checkpoint record (format {got!r}, "
                   f"expected {FORMAT!r})")
    records = meta.get("leaves")
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and "path" in r and "kind" in r for r in records):
        fail(path, "the record has no valid 'leaves' list")
    _check_arrays(step_dir, records, fail)
    return meta
