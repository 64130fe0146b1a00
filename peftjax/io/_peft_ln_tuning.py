# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``LN_TUNING`` adapters, read and written.

PEFT (``tuners/ln_tuning``) wraps every selected norm module and keeps a
trainable deep copy of it; ``save_pretrained`` writes the copy's parameters as
``base_model.model.<module>.ln_tuning_layers.<tensor>`` (``weight``, and
``bias`` for a LayerNorm with one), with no adapter name in the key. In
peftjax each such tensor is one ``adapters.ln_tuning`` leaf whose trainable
``value`` is that tensor (a norm vector has the same layout in both).

Config fields: ``target_modules`` and ``exclude_modules`` select modules as
PEFT's ``check_target_module_exists`` does (a list: exact names or
``.``-suffixes; a string: a regex matching the whole name); the file must hold
exactly the selected modules' tensors. ``modules_to_save`` other than empty is
refused, naming it; every other field is checked by ``check_config``.

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

_COPY = ".ln_tuning_layers."


def _matches(spec: Any, module: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == s or module.endswith("." + s) for s in spec)


def _modules(key_map: Mapping[str, _peft_keys.PeftKey]) -> dict[str, list[str]]:
    """``{module: [unrolled paths of its tensors]}``."""
    out: dict[str, list[str]] = {}
    for upath, k in key_map.items():
        out.setdefault(k.module, []).append(upath)
    return out


def read(config: dict, tensors: dict[str, np.ndarray], params: Any,
         key_map: dict[str, _peft_keys.PeftKey], *, layers_prefix: str,
         param_dtype: Any, source: str, weights: str
         ) -> tuple[dict[str, _adapters.Adapter], _adapters.AdapterState]:
    """``(assignment, state)`` of an ``LN_TUNING`` file (see the module doc).

    Raises:
      ValueError: ``modules_to_save`` set, no ``target_modules``, a selection
        that reaches a non-norm module or nothing, unknown or missing
        tensors, or shapes that disagree with ``params``.
    """
    if config.get("modules_to_save"):
        raise ValueError(f"{source}: LN_TUNING config field modules_to_save="
                         f"{config['modules_to_save']!r} is not supported by "
                         "peftjax (train those leaves with another rule)")
    target = config.get("target_modules")
    if target is None:
        raise ValueError(f"{source}: no target_modules; PEFT would take its default "
                         "for the base model's model_type, which a key map does not "
                         "know: write the norm module names into the file")
    exclude = config.get("exclude_modules")
    modules = _modules(key_map)
    selected = sorted(m for m in modules
                      if _matches(target, m) and not _matches(exclude, m))
    if not selected:
        raise ValueError(f"{source}: target_modules={target!r} (exclude_modules="
                         f"{exclude!r}) selects no module of the key map")
    for m in selected:
        layouts = {key_map[u].layout for u in modules[m]}
        if layouts != {_peft_keys.TensorLayout.VECTOR}:
            raise ValueError(
                f"{source}: target_modules={target!r} selects {m!r}, which has "
                f"{sorted(x.value for x in layouts)} tensors; peftjax's LN tuning "
                "reads norm modules (vector parameters) only")
    wanted = {f"{_peft_write.PREFIX}{key_map[u].module}{_COPY}{key_map[u].tensor}": u
              for m in selected for u in modules[m]}
    unknown = sorted(set(tensors) - set(wanted))
    if unknown:
        raise ValueError(f"load_peft: {len(unknown)} tensor(s) in {weights} are not "
                         f"LN-tuning copies of the modules {source} selects: "
                         f"{unknown[:8]}")
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise ValueError(f"load_peft: target_modules={target!r} in {source} selects "
                         f"modules whose copies {weights} lacks: {missing[:8]}")
    flat = tree.leaves_by_path(params)
    per_leaf: dict[str, dict[int | None, jax.Array]] = {}
    for name, upath in sorted(wanted.items()):
        path, layer = _peft_read._params_path(upath, flat, layers_prefix)
        arr = np.asarray(tensors[name])
        want = tuple(np.shape(flat[path]))[0 if layer is None else 1:]
        if arr.shape != want:
            raise ValueError(f"load_peft: {name} has shape {arr.shape}, but "
                             f"{upath!r} in params has {want}")
        per_leaf.setdefault(path, {})[layer] = jnp.asarray(arr, param_dtype)
    adapter = _adapters.ln_tuning(param_dtype=param_dtype)
    assignment, trainable, frozen = {}, {}, {}
    for path, layers in sorted(per_leaf.items()):
        value = (layers[None] if None in layers else _peft_read._stack_layers(
            layers, path, flat[path].shape[0], "norm copies"))
        assignment[path] = adapter
        trainable[path] = _adapters.LNTuningParams(value)
        frozen[path] = None
    return assignment, _adapters.AdapterState(trainable, frozen)


def write(directory: str | pathlib.Path, assignment: Mapping[str, _adapters.Adapter],
          state: _adapters.AdapterState, params: Any, *,
          key_map: dict[str, _peft_keys.PeftKey], full: Any,
          base_model_name_or_path: str | None, task_type: str | None,
          layers_prefix: str) -> pathlib.Path:
    """Writes ``assignment``'s ``ln_tuning`` leaves as a PEFT ``LN_TUNING`` file.

    Raises:
      ValueError: ``full`` leaves (no ``modules_to_save`` here), a leaf that is
        not a norm vector of the key map, or a norm module only part of whose
        tensors are tuned (PEFT copies the whole module).
    """
    if full:
        raise ValueError("save_peft: an LN_TUNING file with full leaves "
                         f"{sorted(full)} (modules_to_save) is not supported")
    flat = tree.leaves_by_path(params)
    tensors: dict[str, np.ndarray] = {}
    tuned: dict[str, set[str]] = {}
    for path in sorted(assignment):
        leaf = flat.get(path)
        if leaf is None:
            raise ValueError(f"save_peft: {path!r} is not a leaf of params")
        nb = 0 if path in key_map else 1
        value = state.trainable[path].value
        for upath, v in _peft_keys.per_layer(path, value, nb, key_map, layers_prefix,
                                             "save_peft"):
            k = key_map[upath]
            if k.layout is not _peft_keys.TensorLayout.VECTOR:
                raise ValueError(f"save_peft: ln_tuning on {upath!r} ({k}) has no "
                                 "PEFT format: PEFT's LN tuning copies norm modules")
            tensors[f"{_peft_write.PREFIX}{k.module}{_COPY}{k.tensor}"] = (
                np.ascontiguousarray(np.asarray(jax.device_get(v))))
            tuned.setdefault(k.module, set()).add(upath)
    modules = _modules(key_map)
    for m, paths in sorted(tuned.items()):
        rest = sorted(set(modules[m]) - paths)
        if rest:
            raise ValueError(f"save_peft: ln_tuning tunes {sorted(paths)} of the "
                             f"module {m!r} but not {rest}; PEFT's LN tuning copies "
                             "the whole module, so tune every tensor of it")
    config = {
        "peft_type": "LN_TUNING",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "target_modules": sorted(tuned),
        "exclude_modules": None,
        "modules_to_save": None,
    }
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / _peft_write.CONFIG_NAME).write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _safetensors.write_safetensors(out / _peft_write.WEIGHTS_NAME, tensors,
                                   metadata={"format": "pt"})
    return out
