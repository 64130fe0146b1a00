# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT ``target_modules`` -> peftjax rules, with PEFT's semantics.

Porting a PyTorch recipe means porting its targets. PEFT (0.21.2,
``peft.tuners.tuners_utils.check_target_module_exists`` and
``inject_adapter``) matches *module names* (``model.layers.0.self_attn.q_proj``)
with one meaning per type:

* a **list** (or set) of strings: a module is targeted when its full name is
  in the list or ends with ``"." + item`` (suffix semantics; items are not
  regexes); ``layers_to_transform`` (an int or list) and ``layers_pattern``
  then keep only those layer indices, except for items equal to a full name;
* a **string**: a regex that must ``re.fullmatch`` the whole module name;
* ``"all-linear"`` (any case): every ``nn.Linear`` module except the output
  embedding (``lm_head``; for sequence classification the ``classifier``),
  then as a list of full names;
* ``exclude_modules`` (a list with suffix semantics, or a fullmatch regex) and
  ``modules_to_save`` (``(^|.*\\.)name($|\\..*)``) are removed first;
* a matched module that is not ``nn.Linear``/``nn.Embedding`` (a norm, a
  container such as ``mlp``) is an error, and so is matching nothing.

This module reproduces that over a model family's PEFT key map (the module of
every parameter path; container modules are the dotted prefixes of those
names) and turns the selection into ``peftjax.tree.Rule`` objects on the
weight paths, for the unrolled or the scanned layout. peftjax's own rules stay
regexes with ``re.fullmatch`` on paths (docs/conventions.md#rules); the union semantics
live only here, at the porting boundary.

Limit: modules without parameters (activation functions, rotary embeddings)
are not in key maps; a pattern that reaches one is an error in PEFT and is
simply not matched here.

Exports: ``peft_target_modules``, ``peft_target_rules`` (and, for
``load_peft``, ``select_modules`` with the reason each module is left out).
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from peftjax import tree
from peftjax.io import _peft_keys

ALL_LINEAR = "all-linear"
_ADAPTABLE = (_peft_keys.TensorLayout.KERNEL, _peft_keys.TensorLayout.EMBEDDING)


def _modules(key_map: Mapping[str, _peft_keys.PeftKey]) -> dict[str, Any]:
    """``{module name: layout of its weight, or None}`` incl. containers."""
    kinds: dict[str, Any] = {}
    for key in key_map.values():
        parts = key.module.split(".")
        for i in range(1, len(parts)):
            kinds.setdefault(".".join(parts[:i]), None)
        if key.tensor == "weight":
            kinds[key.module] = key.layout
        else:
            kinds.setdefault(key.module, None)
    return kinds


def _as_names(value: Any, arg: str) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(
            isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{arg} must be a str (regex) or a list of str, got {value!r}")


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for pattern in pats:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return None if m is None else int(m.group("idx"))


class Selection(NamedTuple):
    """PEFT's decision for every module of a key map.

    Attributes:
      selected: the adapted module names, in key-map order.
      left_out: ``{module: why}`` for every other module, ``why`` naming the
        config field (and its value) that leaves it out.
    """

    selected: list[str]
    left_out: dict[str, str]


def check_layer_fields(target_modules: Any, layers_to_transform: Any,
                       layers_pattern: Any) -> None:
    """PEFT's ``LoraConfig`` checks of ``layers_to_transform`` / ``layers_pattern``.

    Raises:
      ValueError: either is set with a regex (str) ``target_modules``, or
        ``layers_pattern`` without ``layers_to_transform`` (PEFT raises too).
    """
    if isinstance(target_modules, str) and layers_to_transform is not None:
        raise ValueError(
            f"layers_to_transform={layers_to_transform!r} cannot be used with a regex "
            f"target_modules={target_modules!r} (PEFT raises here too): put the "
            "layer indices into the regex instead")
    if isinstance(target_modules, str) and layers_pattern is not None:
        raise ValueError(
            f"layers_pattern={layers_pattern!r} cannot be used with a regex "
            f"target_modules={target_modules!r} (PEFT raises here too)")
    if layers_pattern and layers_to_transform is None:
        raise ValueError(
            f"layers_pattern={layers_pattern!r} needs layers_to_transform (PEFT "
            "raises here too)")


def select_modules(
    target_modules: str | Sequence[str],
    key_map: Mapping[str, _peft_keys.PeftKey],
    *,
    exclude_modules: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    output_modules: Sequence[str] = (),
) -> Selection:
    """PEFT's selection over a key map, with the reason for each module left out.

    Arguments and errors as :func:`peft_target_modules`.

    Returns:
      A ``Selection(selected, left_out)``.
    """
    key_map = _peft_keys.check_key_map(key_map, "peft_target_modules")
    targets = _as_names(target_modules, "target_modules")
    if targets is None:
        raise TypeError("peft_target_modules: target_modules is None; pass the "
                        "family's default (PEFT's: ['q_proj', 'v_proj'] for Llama)")
    exclude = _as_names(exclude_modules, "exclude_modules")
    save = _as_names(modules_to_save, "modules_to_save") or []
    if isinstance(save, str):
        save = [save]
    if layers_to_transform is not None and (
            isinstance(layers_to_transform, bool) or not (
                isinstance(layers_to_transform, int) or (
                    isinstance(layers_to_transform, (list, tuple)) and all(
                        isinstance(i, int) and not isinstance(i, bool)
                        for i in layers_to_transform)))):
        raise TypeError(f"layers_to_transform must be an int or a list of ints, got "
                        f"{layers_to_transform!r}")
    if layers_pattern is not None:
        _as_names(layers_pattern, "layers_pattern")
    check_layer_fields(targets, layers_to_transform, layers_pattern)
    kinds = _modules(key_map)
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    if all_linear:
        out = set(output_modules)
        targets = sorted(m for m, k in kinds.items()
                         if k is _peft_keys.TensorLayout.KERNEL and m not in out)
    if isinstance(layers_to_transform, tuple):
        layers_to_transform = list(layers_to_transform)
    use_layers = layers_to_transform is not None and (
        not isinstance(layers_to_transform, list) or len(layers_to_transform) > 0)

    def excluded(key: str) -> str:
        if exclude:
            if isinstance(exclude, str):
                if re.fullmatch(exclude, key):
                    return f"exclude_modules={exclude_modules!r} excludes it"
            elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
                return f"exclude_modules={exclude_modules!r} excludes it"
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in save):
            return (f"modules_to_save={modules_to_save!r} names it (trained in full, "
                    "never adapted)")
        return ""

    def unmatched(key: str) -> str:
        no = f"target_modules={target_modules!r} does not match it"
        if isinstance(targets, str):
            return "" if re.fullmatch(targets, key) is not None else no
        if key in targets:
            return ""
        if not any(key.endswith(f".{t}") for t in targets):
            return no
        if use_layers:
            idx = _layer_index(key, layers_pattern)
            where = (f"layers_to_transform={layers_to_transform!r} (layers_pattern="
                     f"{layers_pattern!r})")
            if idx is None:
                return f"{where} finds no layer index in its name"
            keep = (idx == layers_to_transform if isinstance(layers_to_transform, int)
                    else idx in layers_to_transform)
            return "" if keep else f"{where} leaves out its layer {idx}"
        return ""

    selected, left_out, n_excluded = [], {}, 0
    for key, kind in kinds.items():
        why = excluded(key)
        if why:
            n_excluded += 1
            left_out[key] = why
            continue
        why = unmatched(key)
        if why:
            left_out[key] = why
        elif kind not in _ADAPTABLE:
            what = "a container module" if kind is None else f"a {kind.value} tensor"
            raise ValueError(
                f"target_modules={target_modules!r} selects {key!r}, {what}; LoRA "
                "adapts only Linear and Embedding modules (PEFT raises here too)")
        else:
            selected.append(key)
    if not selected:
        why = ("every match was excluded by exclude_modules/modules_to_save"
               if n_excluded else "no module name matches")
        layers = ("" if layers_to_transform is None else
                  f" with layers_to_transform={layers_to_transform!r}, "
                  f"layers_pattern={layers_pattern!r}")
        raise ValueError(
            f"target_modules={target_modules!r}{layers} selects no module ({why}; "
            "PEFT raises here too). Lists match full names or '.'-suffixes, a string "
            f"must re.fullmatch the whole name; modules: {list(kinds)[:8]}...")
    return Selection(selected, left_out)


def peft_target_modules(
    target_modules: str | Sequence[str],
    key_map: Mapping[str, _peft_keys.PeftKey],
    *,
    exclude_modules: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    output_modules: Sequence[str] = (),
) -> list[str]:
    """Returns the module names PEFT's LoRA adapts for a ``target_modules`` input.

    Args:
      target_modules: a list of names (suffix semantics), a regex string
        (``re.fullmatch`` on the full module name) or ``"all-linear"``.
      key_map: the family's ``{unrolled path: PeftKey}``
        (``peftjax.models.llama.peft_key_map(cfg)``, ...).
      exclude_modules: PEFT's ``exclude_modules`` (list or regex).
      modules_to_save: PEFT's ``modules_to_save`` (never adapted).
      layers_to_transform: PEFT's layer filter for list targets (an int or a
        list; an empty list keeps every layer).
      layers_pattern: PEFT's ``layers_pattern`` (the name before the index;
        a str or a list, the first that matches gives the index).
      output_modules: the modules ``"all-linear"`` leaves out (PEFT: the
        model's output embedding, e.g. ``("lm_head",)``).

    Returns:
      The selected module names, in key-map order.

    Raises:
      ValueError: a selected module that LoRA cannot adapt (a norm, a
        container), nothing selected, ``layers_to_transform`` or
        ``layers_pattern`` with a regex ``target_modules``, or
        ``layers_pattern`` alone (as PEFT raises).
      TypeError: arguments of the wrong type.

    Example:
      >>> from peftjax.io import PeftKey, TensorLayout
      >>> km = {f"layers/{i}/{n}/kernel": PeftKey(f"model.layers.{i}.{n}", "weight",
      ...                                         TensorLayout.KERNEL)
      ...       for i in range(2) for n in ("q_proj", "v_proj")}
      >>> peft_target_modules(["q_proj"], km)
      ['model.layers.0.q_proj', 'model.layers.1.q_proj']
      >>> peft_target_modules(r".*1\\.v_proj", km)
      ['model.layers.1.v_proj']
      >>> peft_target_modules(["q_proj", "v_proj"], km, layers_to_transform=[0])
      ['model.layers.0.q_proj', 'model.layers.0.v_proj']
    """
    return select_modules(
        target_modules, key_map, exclude_modules=exclude_modules,
        modules_to_save=modules_to_save, layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern, output_modules=output_modules).selected


def _group_rules(paths: list[str], key_map: Mapping[str, Any], then: Any,
                 layer_prefix: str, scanned: bool) -> list[tree.Rule]:
    per_layer = re.compile(rf"{re.escape(layer_prefix)}/(\d+)/(.+)")
    groups: dict[str, list[int]] = {}
    singles = []
    for p in paths:
        m = per_layer.fullmatch(p)
        if m is None:
            singles.append(p)
        else:
            groups.setdefault(m.group(2), []).append(int(m.group(1)))
    rules = [tree.Rule(where=re.escape(p), then=then) for p in singles]
    for rest, idx in groups.items():
        have = sorted(int(m.group(1)) for k in key_map
                      if (m := per_layer.fullmatch(k)) and m.group(2) == rest)
        every = sorted(idx) == have
        if scanned:
            if not every:
                raise ValueError(
                    f"PEFT selects layers {sorted(idx)} of {layer_prefix}/{{i}}/{rest} "
                    f"but the model has layers {have}; a scanned (stacked) kernel "
                    "adapts every layer: use the unrolled layout")
            where = f"{re.escape(layer_prefix)}/{re.escape(rest)}"
        else:
            alt = r"\d+" if every else "(?:" + "|".join(map(str, sorted(idx))) + ")"
            where = f"{re.escape(layer_prefix)}/{alt}/{re.escape(rest)}"
        rules.append(tree.Rule(where=where, then=then))
    return rules


def peft_target_rules(
    target_modules: str | Sequence[str],
    key_map: Mapping[str, _peft_keys.PeftKey],
    then: Any,
    *,
    embedding_then: Any = None,
    scanned: bool = False,
    layer_prefix: str = "layers",
    **selection: Any,
) -> list[tree.Rule]:
    """Translates a PEFT ``target_modules`` input into peftjax rules.

    The modules are selected as :func:`peft_target_modules` does; each selected
    module's weight path gets ``then`` (an adapter, a label, ...). Paths are
    grouped per layer: ``layers/\\d+/self_attn/q_proj/kernel`` when every layer
    is selected, ``layers/(?:1)/...`` otherwise; with ``scanned=True`` the
    stacked path ``layers/self_attn/q_proj/kernel`` (every layer or an error).

    Args:
      target_modules: PEFT's ``target_modules`` (list, regex or "all-linear").
      key_map: the family's unrolled key map.
      then: payload for selected ``Linear`` weights.
      embedding_then: payload for selected embeddings (PEFT's embedding LoRA;
        e.g. ``lora(r, init=LoRAInit.EMBEDDING)``); required when one is
        selected.
      scanned: emit paths of the scanned layout.
      layer_prefix: the layer container path in the key map.
      **selection: ``exclude_modules``, ``modules_to_save``,
        ``layers_to_transform``, ``layers_pattern``, ``output_modules``.

    Returns:
      A list of ``Rule`` for ``peftjax.tree.assign`` (each matches at least
      one path of the layout it was made for).

    Raises:
      ValueError: as :func:`peft_target_modules`; an embedding without
        ``embedding_then``; a partial layer selection with ``scanned=True``.

    Example:
      >>> from peftjax.io import PeftKey, TensorLayout
      >>> km = {f"layers/{i}/q/kernel": PeftKey(f"model.layers.{i}.q", "weight",
      ...                                       TensorLayout.KERNEL) for i in range(2)}
      >>> [r.where for r in peft_target_rules(["q"], km, "lora")]
      ['layers/\\\\d+/q/kernel']
      >>> [r.where for r in peft_target_rules(["q"], km, "lora", scanned=True)]
      ['layers/q/kernel']
    """
    modules = set(peft_target_modules(target_modules, key_map, **selection))
    paths, embeddings = [], []
    for path, key in key_map.items():
        if key.module in modules and key.tensor == "weight":
            paths.append(path)
            if key.layout is _peft_keys.TensorLayout.EMBEDDING:
                embeddings.append(path)
    if embeddings and embedding_then is None:
        raise ValueError(
            f"target_modules={target_modules!r} selects the embedding(s) {embeddings}; "
            "pass embedding_then= (e.g. adapters.lora(r, init=LoRAInit.EMBEDDING), "
            "PEFT's embedding LoRA) or leave them out of target_modules")
    linear = [p for p in paths if p not in embeddings]
    rules = _group_rules(linear, key_map, then, layer_prefix, scanned)
    if embeddings:
        rules += _group_rules(embeddings, key_map, embedding_then, layer_prefix,
                              scanned)
    return rules
