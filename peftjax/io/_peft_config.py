# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT ``adapter_config.json``: what peftjax honours, and checks.

PEFT writes every field of its config class. peftjax honours the fields that
change the weights it reads (``r``, ``lora_alpha``, ``use_rslora``,
``rank_pattern``, ``alpha_pattern``, ``use_dora``, ``modules_to_save``,
``ensure_weight_tying``, VeRA's projections, (IA)³'s ``feedforward_modules``),
accepts descriptive fields
(``target_modules``, ``base_model_name_or_path``, ``task_type``, ...), and
refuses any other field whose value differs from PEFT's default, naming it:
nothing is silently dropped.

Exports: ``SUPPORTED_PEFT_TYPES``, ``check_config``, ``pattern_value``,
``expected_modules``.
"""

import re
from collections.abc import Mapping
from typing import Any

SUPPORTED_PEFT_TYPES = ("LORA", "VERA", "IA3")

# Fields that only describe the adapter or steer PEFT's targeting (the
# tensors in the file say which modules are adapted), for every type.
_DESCRIPTIVE = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version",
    "base_model_name_or_path", "revision", "inference_mode", "target_modules",
    "exclude_modules", "modules_to_save", "runtime_config",
})

# Fields peftjax honours when reading, per type.
_HONOURED = {
    "LORA": frozenset({"r", "lora_alpha", "use_rslora", "rank_pattern",
                       "alpha_pattern", "use_dora", "lora_dropout",
                       "init_lora_weights", "ensure_weight_tying"}),
    "VERA": frozenset({"r", "projection_prng_key", "save_projection",
                       "vera_dropout", "d_initial", "init_weights"}),
    "IA3": frozenset({"feedforward_modules", "init_ia3_weights"}),
}

# Fields peftjax cannot honour: accepted only at PEFT's default value
# (peft 0.21.2's ``to_dict()`` of a default config).
_DEFAULTS = {
    "LORA": {
        "fan_in_fan_out": False, "bias": "none", "layers_to_transform": None,
        "layers_pattern": None, "megatron_config": None,
        "megatron_core": "megatron.core", "trainable_token_indices": None,
        "loftq_config": {}, "eva_config": None, "corda_config": None,
        "lora_ga_config": None, "velora_config": None,
        "alora_invocation_tokens": None, "use_qalora": False,
        "qalora_group_size": 16, "monteclora_config": None,
        "layer_replication": None, "lora_bias": False, "target_parameters": None,
        "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    },
    "VERA": {"fan_in_fan_out": False, "bias": "none",
             "layers_to_transform": None, "layers_pattern": None},
    "IA3": {"fan_in_fan_out": False},
}

# init_lora_weights values that leave the base model untouched; an adapter
# saved with PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ init unconverted sits on a
# modified base, which the caller's params are not.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
# Sub-configs that only steer PEFT's initialisation: inert once the init is
# plain (PEFT's path_initial_model_for_weight_conversion sets
# init_lora_weights=True and keeps e.g. corda_config).
_INIT_ONLY = frozenset({"corda_config", "lora_ga_config", "eva_config",
                        "loftq_config"})


def _is_default(value: Any, default: Any) -> bool:
    if default is None:
        return value is None or value == [] or value == {}
    return value == default


def check_config(config: Mapping[str, Any], source: str) -> str:
    """Validates an ``adapter_config.json`` dict and returns its ``peft_type``.

    Args:
      config: the parsed JSON.
      source: the file, for error messages.

    Returns:
      The upper-case ``peft_type`` (one of ``SUPPORTED_PEFT_TYPES``).

    Raises:
      ValueError: a missing or unsupported ``peft_type``, or fields that
        peftjax cannot honour set to non-default values (all of them named).

    Example:
      >>> check_config({"peft_type": "LORA", "r": 4}, "cfg.json")
      'LORA'
      >>> check_config({"peft_type": "LORA", "lora_bias": True}, "cfg.json")
      ... # doctest: +IGNORE_EXCEPTION_DETAIL
      Traceback (most recent call last):
      ValueError: ... lora_bias=True ...
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: adapter config must be a JSON object")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise ValueError(f"{source}: no 'peft_type' (the one mandatory key)")
    peft_type = peft_type.upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise ValueError(
            f"{source}: peft_type={peft_type!r} is not supported; peftjax reads "
            f"{list(SUPPORTED_PEFT_TYPES)}"
        )
    defaults = _DEFAULTS[peft_type]
    honoured = _HONOURED[peft_type]
    init = config.get("init_lora_weights", True)
    plain = peft_type == "LORA" and init in _PLAIN_INITS
    bad: list[str] = []
    for field, value in config.items():
        if (field in _DESCRIPTIVE or field in honoured
                or (plain and field in _INIT_ONLY)):
            continue
        if field in defaults:
            if not _is_default(value, defaults[field]):
                bad.append(f"{field}={value!r} (default {defaults[field]!r})")
        elif not _is_default(value, None) and value is not False:
            bad.append(f"{field}={value!r} (a field peftjax does not know)")
    if peft_type == "LORA" and not plain:
        bad.append(
            f"init_lora_weights={init!r} (the adapter sits on a modified base; "
            "save it from PEFT with path_initial_model_for_weight_conversion)"
        )
    if peft_type == "VERA" and config.get("save_projection") is False:
        bad.append("save_projection=False (torch's generator cannot be "
                   "reproduced; save the VeRA projections)")
    if bad:
        raise ValueError(
            f"{source}: {peft_type} config fields peftjax cannot honour: "
            + "; ".join(bad)
        )
    return peft_type


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup for one module name.

    A key matches when ``re.match(rf"(.*\\.)?({key})$", module)`` does (PEFT's
    ``get_pattern_key``); the first matching key in the dict's order wins.

    Args:
      patterns: ``{pattern: value}``.
      module: the full module name (``model.layers.0.self_attn.q_proj``).
      default: the value when no key matches (``r`` or ``lora_alpha``).

    Returns:
      The value for ``module``.

    Example:
      >>> pattern_value({"q_proj": 4}, "model.layers.0.self_attn.q_proj", 8)
      4
      >>> pattern_value({"q_proj": 4}, "model.layers.0.self_attn.v_proj", 8)
      8
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _selects(spec: Any, module: str) -> bool:
    """PEFT's module selection: a str is a full regex, a list exact or suffix names."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return module in spec or any(module.endswith("." + t) for t in spec)


def expected_modules(config: Mapping[str, Any], modules: list[str]) -> set[str] | None:
    r"""The modules among ``modules`` that PEFT would adapt under ``config``.

    PEFT's ``check_target_module_exists``: ``target_modules`` (a str is a
    regex matched in full, a list matches exact names or ``.``-suffixes),
    minus ``exclude_modules`` and modules under ``modules_to_save``.

    Args:
      config: the parsed ``adapter_config.json``.
      modules: the adaptable module names of the key map.

    Returns:
      The selected names, or None when ``target_modules`` is absent or
      ``"all-linear"`` (PEFT expands that from the torch model's classes,
      which a key map does not describe).

    Example:
      >>> sorted(expected_modules({"target_modules": ["q"]}, ["l.0.q", "l.0.k"]))
      ['l.0.q']
      >>> sorted(expected_modules({"target_modules": r"l\.\d\.(q|k)",
      ...                          "exclude_modules": ["k"]}, ["l.0.q", "l.0.k"]))
      ['l.0.q']
    """
    target = config.get("target_modules")
    if not target or target == "all-linear":
        return None
    exclude = config.get("exclude_modules") or []
    saved = config.get("modules_to_save") or []
    return {m for m in modules
            if _selects(target, m) and not (exclude and _selects(exclude, m))
            and not any(re.match(rf"(^|.*\.){s}($|\..*)", m) for s in saved)}
