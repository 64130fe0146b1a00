# SPDX-License-Identifier: Apache-2.0
"""Checks ``load_peft`` makes of a file against its config and key map.

The adapted modules are exactly those the config selects, ``modules_to_save``
modules are present, and a tied head holds PEFT's copies of its table.

Exports: nothing public (``_peft_read.load_peft`` uses them).
"""

import warnings
from typing import Any

import numpy as np

from peftjax.io import _peft_config, _peft_keys, _peft_tuners, _peft_write


def _check_selection(selection: Any, config: dict,
                     key_map: dict[str, _peft_keys.PeftKey], parts: dict[str, Any],
                     peft_type: str, source: str, weights: str) -> None:
    """The file's adapted modules are exactly the ones the config selects."""
    found = {key_map[u].module: u for u in parts}
    chosen = set(selection.selected)
    extra = sorted(m for m in found if m not in chosen)
    if extra:
        why = [f"{m!r} ({found[m]!r}): {selection.left_out[m]}" for m in extra[:8]]
        raise ValueError(
            f"load_peft: {weights} holds {peft_type} tensors for {len(extra)} "
            f"module(s) that {source} does not select (PEFT would not adapt them): "
            + "; ".join(why))
    layouts = {k.module: k.layout for k in key_map.values() if k.tensor == "weight"}
    emb = [m for m in selection.selected
           if layouts.get(m) is _peft_keys.TensorLayout.EMBEDDING]
    tuner = _peft_tuners.TUNERS.get(peft_type)
    if emb and peft_type != "LORA" and not (tuner is not None and tuner.embeddings):
        raise ValueError(f"load_peft: target_modules in {source} selects the "
                         f"embedding(s) {emb}; PEFT's {peft_type} adapts Linear "
                         "modules only (PEFT raises here too)")
    missing = sorted(chosen - set(found))
    if missing:
        layers = ("" if config.get("layers_to_transform") is None else
                  f" with layers_to_transform={config['layers_to_transform']!r}")
        raise ValueError(
            f"load_peft: target_modules={config.get('target_modules')!r}{layers} in "
            f"{source} selects {len(missing)} module(s) of the key map with no "
            f"tensors in {weights}: {missing[:8]}")
    unused = _peft_config.unused_pattern_keys(config, selection.selected)
    if unused:
        warnings.warn(f"load_peft: {source}: pattern keys that match no selected "
                      f"module are ignored (as PEFT does): {unused}", RuntimeWarning,
                      stacklevel=3)


def _check_saved(config: dict, key_map: dict[str, _peft_keys.PeftKey],
                 full_u: dict[str, Any], source: str) -> None:
    """Modules ``modules_to_save`` names must be in the file."""
    saved_found = {key_map[u].module for u in full_u}
    absent = []
    for name in config.get("modules_to_save") or []:
        owners = {k.module for k in key_map.values()
                  if k.module == name or k.module.endswith("." + name)}
        if owners and not owners & saved_found:
            absent.append(name)
    if absent:
        raise ValueError(f"load_peft: modules_to_save {absent} in {source} name "
                         "modules of the key map, but the file holds none of their "
                         "tensors")


def _check_tied(tied_head: tuple[str, str], key_map: dict[str, _peft_keys.PeftKey],
                parts: dict[str, dict[str, np.ndarray]], full_u: dict[str, Any],
                copies: dict[str, np.ndarray], config: dict, source: str) -> None:
    """The tied head's tensors are PEFT's copies of the table's, and PEFT ties it."""
    path, head = tied_head
    module = key_map[path].module
    lora = parts.get(path)
    if (lora is not None or path in full_u) and not config.get("ensure_weight_tying"):
        raise ValueError(
            f"load_peft: {source} adapts the table {module!r} that {head!r} is tied "
            "to, without ensure_weight_tying: PEFT then applies it to the lookup "
            f"only and leaves {head!r} unadapted, which one shared table cannot "
            "reproduce; save the adapter from PEFT with ensure_weight_tying=True")
    want: dict[str, np.ndarray] = {}
    if lora is not None:
        want = {"lora_A.weight": lora["b"].T, "lora_B.weight": lora["a"].T}
    elif path in full_u:
        want = {"weight": full_u[path]}
    for name, arr in sorted(copies.items()):
        ref = want.get(name)
        if ref is None or np.shape(arr) != np.shape(ref) or not np.array_equal(
                arr, np.asarray(ref).astype(arr.dtype)):
            raise ValueError(
                f"load_peft: {_peft_write.PREFIX}{head}.{name} (shape "
                f"{np.shape(arr)}) is not the tied copy of {module!r}'s "
                f"{'LoRA' if lora is not None else 'table'}; a tied head cannot "
                "differ from its table")
