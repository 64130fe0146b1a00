# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``TRAINABLE_TOKENS`` adapters, read and written.

PEFT (``tuners/trainable_tokens``) wraps the selected tables and saves, per
table, ``base_model.model.<module>.trainable_tokens_delta`` ``(k, d)``: the
values of the rows ``token_indices`` (a list in the config, one for every
table), not differences. In peftjax each such table is one
``adapters.trainable_tokens(token_indices)`` leaf whose trainable ``values``
is that tensor, unchanged: an embedding table ``(vocab, d)`` has the same
layout in both, and for a Linear (an untied ``lm_head`` targeted by name)
torch's rows are the Flax kernel's columns, so the adapter views the kernel
``(d, vocab)`` with its vocabulary axis as rows.

A head tied to the input embedding (``tie_word_embeddings``): PEFT puts a
second layer on it that shares the embedding's tensors and saves them once
more under the head's name (``base_model.model.lm_head.trainable_tokens_delta``).
peftjax's tied model has one table for both, so with ``tied_head=(table path,
head module)`` ``save_peft`` writes that copy and ``load_peft`` checks it
equals the table's; without ``tied_head`` such a copy is an error naming it.

Config fields: ``token_indices`` (distinct ints, the same rows for every
table), ``init_weights`` (inert once trained: the values are in the file),
``target_modules`` / ``exclude_modules`` (a list: exact names or
``.``-suffixes; a string: a regex matching the whole name; None, as PEFT, the
model's input embedding: the key map's one ``EMBEDDING`` module). The file
must hold exactly the selected tables' tensors. ``modules_to_save`` other
than empty is refused, naming it.

Used by ``load_peft`` and ``save_peft`` (the public entry points).
"""

import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.io import _peft_keys, _peft_read, _peft_write, _safetensors

SUFFIX = ".trainable_tokens_delta"
_LAYOUTS = (_peft_keys.TensorLayout.EMBEDDING, _peft_keys.TensorLayout.KERNEL)


def _matches(spec: Any, module: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == s or module.endswith("." + s) for s in spec)


def token_dims(key: _peft_keys.PeftKey, ndim: int, n_batch: int, where: str
               ) -> tree.DimensionNumbers | None:
    """The view whose input axis is the token axis of a table or head kernel.

    Args:
      key: the unrolled key (``EMBEDDING``, or a plain 2-D ``KERNEL``).
      ndim: the leaf's rank (with its layer axis when scanned).
      n_batch: 0 (unrolled) or 1 (scanned).
      where: for errors.

    Returns:
      None (an unrolled table), or the explicit view.

    Raises:
      ValueError: a vector, or a kernel with its own matrix view.
    """
    if key.layout is _peft_keys.TensorLayout.EMBEDDING:
        return _peft_keys.leaf_dimension_numbers(key, ndim, n_batch)
    if key.layout is not _peft_keys.TensorLayout.KERNEL or key.dimension_numbers is not None:
        raise ValueError(f"{where}: trainable tokens on {key.module!r} ({key.layout.value}"
                         f"{', a kernel with its own view' if key.dimension_numbers else ''}"
                         "): PEFT's trainable tokens replace rows of an embedding "
                         "table or of a Linear's (vocab, d) weight")
    b = tuple(range(n_batch))
    return tree.DimensionNumbers(reduction_axis=n_batch + 1, output_axis=n_batch,
                                 batch_axis=b)


def _indices(config: Mapping[str, Any], source: str) -> list[int]:
    idx = config.get("token_indices")
    if (not isinstance(idx, list) or not idx
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx)):
        raise ValueError(f"{source}: TRAINABLE_TOKENS needs token_indices, a non-empty "
                         f"list of ints; got {idx!r}")
    return idx


def read(config: dict, tensors: dict[str, np.ndarray], params: Any,
         key_map: dict[str, _peft_keys.PeftKey], *, layers_prefix: str,
         param_dtype: Any, source: str, weights: str,
         tied_head: tuple[str, str] | None = None,
         ) -> tuple[dict[str, _adapters.Adapter], _adapters.AdapterState]:
    """``(assignment, state)`` of a ``TRAINABLE_TOKENS`` file (see the module doc).

    Raises:
      ValueError: ``modules_to_save`` set; bad ``token_indices``; a selection
        that reaches a non-table module or nothing; unknown or missing
        tensors; shapes that disagree with ``params``; a tied head's copy
        that differs from its table's, or one without ``tied_head``.
    """
    if config.get("modules_to_save"):
        raise ValueError(f"{source}: TRAINABLE_TOKENS config field modules_to_save="
                         f"{config['modules_to_save']!r} is not supported by peftjax "
                         "(train those leaves with another rule)")
    idx = _indices(config, source)
    head = ("" if tied_head is None
            else _peft_keys.check_tied_head(tied_head, key_map, "load_peft"))
    weight_of = {k.module: u for u, k in key_map.items()
                 if k.tensor == "weight" and k.layout in _LAYOUTS}
    target = config.get("target_modules")
    if target is None:
        emb = sorted(m for m, u in weight_of.items()
                     if key_map[u].layout is _peft_keys.TensorLayout.EMBEDDING)
        if len(emb) != 1:
            raise ValueError(f"{source}: no target_modules, and the key map has "
                             f"{len(emb)} embedding tables {emb[:4]} where PEFT would "
                             "take the model's input embedding: name it in the file")
        target = emb
    exclude = config.get("exclude_modules")
    modules = sorted({k.module for k in key_map.values()})
    selected = [m for m in modules if _matches(target, m) and not _matches(exclude, m)]
    if not selected:
        raise ValueError(f"{source}: target_modules={target!r} (exclude_modules="
                         f"{exclude!r}) selects no module of the key map")
    for m in selected:
        if m not in weight_of:
            raise ValueError(f"{source}: target_modules={target!r} selects {m!r}, which "
                             "is no embedding table or Linear; PEFT's trainable tokens "
                             "replace rows of a table")
    wanted = {f"{_peft_write.PREFIX}{m}{SUFFIX}": weight_of[m] for m in selected}
    copy = f"{_peft_write.PREFIX}{head}{SUFFIX}" if head else None
    unknown = sorted(set(tensors) - set(wanted) - {copy})
    if unknown:
        hint = ("; a head tied to the embedding? pass tied_head=(table path, head module)"
                if any(n.endswith(SUFFIX) for n in unknown) and tied_head is None else "")
        raise ValueError(f"load_peft: {len(unknown)} tensor(s) in {weights} are not "
                         f"trainable-token rows of the modules {source} selects: "
                         f"{unknown[:8]}{hint}")
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise ValueError(f"load_peft: target_modules={target!r} in {source} selects "
                         f"tables whose rows {weights} lacks: {missing[:8]}")
    if copy in tensors:
        table = f"{_peft_write.PREFIX}{key_map[tied_head[0]].module}{SUFFIX}"
        ref = tensors.get(table)
        arr = tensors[copy]
        if ref is None or arr.shape != ref.shape or not np.array_equal(arr, ref):
            raise ValueError(f"load_peft: {copy} (shape {arr.shape}) is not the tied "
                             f"copy of {table}; a tied head cannot differ from its table")
    flat = tree.leaves_by_path(params)
    per_leaf: dict[str, dict[int | None, jax.Array]] = {}
    dims_of: dict[str, tree.DimensionNumbers | None] = {}
    for name, upath in sorted(wanted.items()):
        path, layer = _peft_read._params_path(upath, flat, layers_prefix)
        nb = 0 if layer is None else 1
        shape = tuple(np.shape(flat[path]))
        dn = token_dims(key_map[upath], len(shape), nb, source)
        r = tree.resolve(dn, shape, path=path)
        arr = np.asarray(tensors[name])
        if arr.shape != (len(idx), r.n_out):
            raise ValueError(f"load_peft: {name} has shape {arr.shape}, but "
                             f"{len(idx)} token_indices of {upath!r} {shape} in params "
                             f"need {(len(idx), r.n_out)}")
        if max(idx) >= r.n_in:
            raise ValueError(f"{source}: token index {max(idx)} is out of range for "
                             f"{upath!r} with {r.n_in} rows (shape {shape})")
        per_leaf.setdefault(path, {})[layer] = jnp.asarray(arr, param_dtype)
        dims_of[path] = dn
    init_weights = config.get("init_weights", True)
    assignment, trainable, frozen = {}, {}, {}
    for path, layers in sorted(per_leaf.items()):
        value = (layers[None] if None in layers else _peft_read._stack_layers(
            layers, path, flat[path].shape[0], "trainable-token rows"))
        assignment[path] = _adapters.trainable_tokens(
            idx, init_weights=bool(init_weights), dimension_numbers=dims_of[path],
            param_dtype=param_dtype)
        trainable[path] = _adapters.TrainableTokensParams(value)
        frozen[path] = None
    return assignment, _adapters.AdapterState(trainable, frozen)


def write(directory: str | pathlib.Path, assignment: Mapping[str, _adapters.Adapter],
          state: _adapters.AdapterState, params: Any, *,
          key_map: dict[str, _peft_keys.PeftKey], full: Any,
          base_model_name_or_path: str | None, task_type: str | None,
          layers_prefix: str, tied_head: tuple[str, str] | None = None,
          ) -> pathlib.Path:
    """Writes ``assignment``'s ``trainable_tokens`` leaves as a ``TRAINABLE_TOKENS`` file.

    Raises:
      ValueError: ``full`` leaves (no ``modules_to_save`` here), tables with
        different ``token_indices`` (PEFT's config has one list), a leaf that
        is no table or head kernel of the key map, or one viewed with its
        rows on another axis than PEFT's.
    """
    if full:
        raise ValueError("save_peft: a TRAINABLE_TOKENS file with full leaves "
                         f"{sorted(full)} (modules_to_save) is not supported")
    head = ("" if tied_head is None
            else _peft_keys.check_tied_head(tied_head, key_map, "save_peft"))
    flat = tree.leaves_by_path(params)
    hyper = {p: dict(a.hyperparameters) for p, a in assignment.items()}
    lists = {hp["token_indices"] for hp in hyper.values()}
    if len(lists) != 1:
        raise ValueError("save_peft: PEFT's TRAINABLE_TOKENS config holds one "
                         "token_indices list for every table; got "
                         f"{ {p: list(hp['token_indices']) for p, hp in sorted(hyper.items())} }")
    idx = list(lists.pop())
    tensors: dict[str, np.ndarray] = {}
    modules: list[str] = []
    for path in sorted(assignment):
        leaf = flat.get(path)
        if leaf is None:
            raise ValueError(f"save_peft: {path!r} is not a leaf of params")
        nb = 0 if path in key_map else 1
        for upath, v in _peft_keys.per_layer(path, state.trainable[path].values, nb,
                                             key_map, layers_prefix, "save_peft"):
            k = key_map[upath]
            want = token_dims(k, np.ndim(leaf), nb, f"save_peft: {upath!r}")
            shape = tuple(np.shape(leaf))
            got_r = tree.resolve(assignment[path].dimension_numbers, shape, path=path)
            want_r = tree.resolve(want, shape, path=path)
            if (got_r.reduction, got_r.output) != (want_r.reduction, want_r.output):
                raise ValueError(
                    f"save_peft: trainable_tokens on {path!r} {shape} takes rows along "
                    f"axis {got_r.reduction}, but PEFT's {k.module!r} ({k.layout.value}) "
                    f"has its tokens along axis {want_r.reduction}")
            tensors[f"{_peft_write.PREFIX}{k.module}{SUFFIX}"] = (
                np.ascontiguousarray(np.asarray(jax.device_get(v))))
            modules.append(k.module)
            if head and upath == tied_head[0]:  # PEFT saves the tied layer's copy too
                tensors[f"{_peft_write.PREFIX}{head}{SUFFIX}"] = tensors[
                    f"{_peft_write.PREFIX}{k.module}{SUFFIX}"].copy()
    inits = {hp["init_weights"] for hp in hyper.values()}
    config = {
        "peft_type": "TRAINABLE_TOKENS",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "target_modules": sorted(modules),
        "token_indices": idx,
        "init_weights": inits == {True},
    }
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / _peft_write.CONFIG_NAME).write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _safetensors.write_safetensors(out / _peft_write.WEIGHTS_NAME, tensors,
                                   metadata={"format": "pt"})
    return out
