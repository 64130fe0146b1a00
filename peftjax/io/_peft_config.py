# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT ``adapter_config.json``: what peftjax honours, and checks.

PEFT writes every field of its config class. peftjax honours the fields that
change the weights it reads (``r``, ``lora_alpha``, ``use_rslora``,
``rank_pattern``, ``alpha_pattern``, ``use_dora``, ``lora_dropout``,
``modules_to_save``, ``ensure_weight_tying``, VeRA's projections, (IA)³'s
``feedforward_modules``, LoHa's ``r``/``alpha``/patterns, QA-LoRA's
``use_qalora`` / ``qalora_group_size``, BD-LoRA's ``use_bdlora``,
MonteCLoRA's ``monteclora_config``, KaSA's ``kasa_config``,
``layer_replication`` (checked against the key map's depth: the caller
replicates the base)) and the fields that select modules
(``target_modules``, ``exclude_modules``, ``layers_to_transform``,
``layers_pattern``: ``load_peft`` requires the file's tensors to be exactly
the selected modules'), accepts descriptive fields
(``base_model_name_or_path``, ``task_type``, ...), and refuses any other
field whose value differs from PEFT's default, naming it: nothing is
silently dropped. Fields of the wrong JSON type are errors naming the file.

Exports: ``SUPPORTED_PEFT_TYPES``, ``alpha_for``, ``check_config``,
``most_common``, ``pattern_value``, ``selection``, ``unused_pattern_keys``,
``is_feedforward``.
"""

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from peftjax.io import _peft_targets

# Types with their own read/write code; the per-module weight tuners
# (``_peft_tuners.TUNERS``) are added by the caller of ``check_config``.
SUPPORTED_PEFT_TYPES = ("LORA", "VERA", "IA3", "LN_TUNING", "TRAINABLE_TOKENS")

# Fields that describe the adapter, or select modules (``selection``), for
# every type.
_DESCRIPTIVE = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version",
    "base_model_name_or_path", "revision", "inference_mode", "target_modules",
    "exclude_modules", "modules_to_save", "runtime_config",
})

# Fields peftjax honours when reading, per type.
_HONOURED = {
    "LORA": frozenset({"r", "lora_alpha", "use_rslora", "rank_pattern",
                       "alpha_pattern", "use_dora", "lora_dropout",
                       "init_lora_weights", "ensure_weight_tying",
                       "layers_to_transform", "layers_pattern",
                       "use_qalora", "qalora_group_size", "layer_replication",
                       "use_bdlora", "monteclora_config", "kasa_config",
                       "alora_invocation_tokens"}),
    "VERA": frozenset({"r", "projection_prng_key", "save_projection",
                       "d_initial", "init_weights", "layers_to_transform",
                       "layers_pattern"}),
    "IA3": frozenset({"feedforward_modules", "init_ia3_weights"}),
    # LN tuning has no fields of its own (selection and modules_to_save only).
    "LN_TUNING": frozenset(),
    # the rows to train; init_weights is inert once the values are in the file
    "TRAINABLE_TOKENS": frozenset({"token_indices", "init_weights"}),
}

# Fields peftjax cannot honour: accepted only at PEFT's default value
# (peft 0.21.2's ``to_dict()`` of a default config).
_DEFAULTS = {
    "LORA": {
        "fan_in_fan_out": False, "bias": "none", "megatron_config": None,
        "megatron_core": "megatron.core", "trainable_token_indices": None,
        "loftq_config": {}, "eva_config": None, "corda_config": None,
        "lora_ga_config": None, "velora_config": None,
        "lora_bias": False, "target_parameters": None,
        "arrow_config": None,
    },
    # peftjax's VeRA has no input dropout.
    "VERA": {"fan_in_fan_out": False, "bias": "none", "vera_dropout": 0.0},
    "IA3": {"fan_in_fan_out": False},
    "LN_TUNING": {},
    "TRAINABLE_TOKENS": {},
}

# Types that are model inputs or hooks, read by functions of their own.
_OTHER_READERS = {
    **{k: "load_peft_prompt" for k in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING",
                                       "CPT", "MULTITASK_PROMPT_TUNING", "CARTRIDGE")},
    "ADAPTION_PROMPT": "load_peft_adaption_prompt",
    "POLY": "load_peft_poly",
    "XLORA": "load_peft_xlora",
}

# init_lora_weights values that leave the base model untouched ("mica" reads
# as inits.mica's adapter, lora_B frozen); an adapter
# saved with PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ init unconverted sits on a
# modified base, which the caller's params are not.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")
# Sub-configs that only steer PEFT's initialisation: inert once the init is
# plain (PEFT's path_initial_model_for_weight_conversion sets
# init_lora_weights=True and keeps e.g. corda_config).
_INIT_ONLY = frozenset({"corda_config", "lora_ga_config", "eva_config",
                        "loftq_config"})


def _names(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list)
                                  and all(isinstance(x, str) for x in v))


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


# The JSON type of each field peftjax reads (None is accepted for each).
_TYPES = {
    "target_modules": (_names, "a str (regex) or a list of str"),
    "exclude_modules": (_names, "a str (regex) or a list of str"),
    "modules_to_save": (lambda v: isinstance(v, list) and _names(v), "a list of str"),
    "layers_to_transform": (lambda v: _int(v) or (isinstance(v, list) and all(
        _int(i) for i in v)), "an int or a list of ints"),
    "layers_pattern": (_names, "a str or a list of str"),
    "feedforward_modules": (_names, "a str (regex) or a list of str"),
    "r": (lambda v: _int(v) and v > 0, "a positive int"),
    "scaling": (_number, "a finite number"),
    "lora_alpha": (_number, "a finite number"),
    "alpha": (_number, "a finite number"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "d_initial": (_number, "a finite number"),
    "projection_prng_key": (_int, "an int"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(
        _int(x) and x > 0 for x in v.values()), "an object of positive ints"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(
        _number(x) for x in v.values()), "an object of numbers"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "ensure_weight_tying": (lambda v: isinstance(v, bool), "true or false"),
    "use_qalora": (lambda v: isinstance(v, bool), "true or false"),
    "qalora_group_size": (lambda v: _int(v) and v > 0, "a positive int"),
    "layer_replication": (lambda v: isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and all(_int(i) and i >= 0 for i in p)
        and p[0] < p[1] for p in v), "a list of [start, end) pairs of ints"),
    "use_bdlora": (lambda v: isinstance(v, dict) and set(v) <= {
        "target_modules_bd_a", "target_modules_bd_b", "nblocks", "match_strict"}
        and _int(v.get("nblocks", 1)) and v.get("nblocks", 1) > 0
        and all(x is None or (isinstance(x, list) and all(isinstance(i, str) for i in x))
                for x in (v.get("target_modules_bd_a"), v.get("target_modules_bd_b")))
        and isinstance(v.get("match_strict", True), bool),
        "a BdLoraConfig object (lists of str, a positive nblocks, match_strict)"),
    "monteclora_config": (lambda v: isinstance(v, dict) and set(v) <= {
        "num_samples", "use_entropy", "dirichlet_prior", "sample_scaler",
        "kl_loss_weight", "buffer_size"} and _int(v.get("num_samples", 8))
        and v.get("num_samples", 8) > 0 and isinstance(v.get("use_entropy", False), bool)
        and all(_number(v.get(k, 1.0)) and v.get(k, 1.0) > 0
                for k in ("dirichlet_prior", "sample_scaler"))
        and _number(v.get("kl_loss_weight", 0.0)),
        "a MontecloraConfig object (positive num_samples, dirichlet_prior, "
        "sample_scaler)"),
    "kasa_config": (lambda v: isinstance(v, dict) and set(v) <= {"beta", "gamma"}
                    and all(_number(v.get(k, 0.0)) and v.get(k, 0.0) >= 0
                            for k in ("beta", "gamma")),
                    "a KasaConfig object (beta, gamma >= 0)"),
    "alora_invocation_tokens": (lambda v: isinstance(v, list) and len(v) > 0 and all(
        _int(i) and i >= 0 for i in v), "a non-empty list of token ids"),
}


def _check_types(config: Mapping[str, Any], source: str,
                 types: Mapping[str, tuple]) -> None:
    bad = [f"{field}={config[field]!r} (must be {what})"
           for field, (ok, what) in types.items()
           if config.get(field) is not None and not ok(config[field])]
    if bad:
        raise ValueError(f"{source}: wrong-typed fields: " + "; ".join(bad))


def _is_default(value: Any, default: Any) -> bool:
    if default is None:
        return value is None or value == [] or value == {}
    return value == default


def check_config(config: Mapping[str, Any], source: str,
                 tuners: Mapping[str, Any] | None = None) -> str:
    """Validates an ``adapter_config.json`` dict and returns its ``peft_type``.

    Args:
      config: the parsed JSON.
      source: the file, for error messages.
      tuners: ``{peft_type: Tuner}`` of the per-module weight tuners
        (``_peft_tuner.Tuner``: their ``honoured``, ``defaults``,
        ``field_types`` and ``check``), besides ``SUPPORTED_PEFT_TYPES``.

    Returns:
      The upper-case ``peft_type`` (one of ``SUPPORTED_PEFT_TYPES``).

    Raises:
      ValueError: a missing or unsupported ``peft_type``, fields of the wrong
        JSON type, or fields that peftjax cannot honour set to non-default
        values (all of them named).

    Example:
      >>> check_config({"peft_type": "LORA", "r": 4}, "cfg.json")
      'LORA'
      >>> check_config({"peft_type": "LORA", "lora_bias": True}, "cfg.json")
      ... # doctest: +IGNORE_EXCEPTION_DETAIL
      Traceback (most recent call last):
      ValueError: ... lora_bias=True ...
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: adapter config must be a JSON object, got "
                         f"{type(config).__name__}")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise ValueError(f"{source}: no 'peft_type' (the one mandatory key)")
    peft_type = peft_type.upper()
    tuners = tuners or {}
    supported = sorted((*SUPPORTED_PEFT_TYPES, *tuners))
    if peft_type not in supported:
        reader = _OTHER_READERS.get(peft_type)
        raise ValueError(
            f"{source}: peft_type={peft_type!r} is not supported; peftjax reads "
            f"{supported}" + (f" ({peft_type}: read it with io.{reader})" if reader else "")
        )
    tuner = tuners.get(peft_type)
    _check_types(config, source, {**_TYPES, **(tuner.field_types if tuner else {})})
    defaults = tuner.defaults if tuner else _DEFAULTS[peft_type]
    honoured = tuner.honoured if tuner else _HONOURED[peft_type]
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
    ff, target = config.get("feedforward_modules"), config.get("target_modules")
    if (peft_type == "IA3" and isinstance(ff, list) and isinstance(target, list)
            and not set(ff) <= set(target)):
        bad.append(f"feedforward_modules={ff!r} is not a subset of target_modules="
                   f"{target!r} (PEFT raises here too)")
    if tuner is not None and tuner.check is not None:
        bad += tuner.check(config, source)
    if peft_type == "VERA" and config.get("save_projection") is False:
        bad.append("save_projection=False (torch's generator cannot be "
                   "reproduced; save the VeRA projections)")
    if bad:
        raise ValueError(
            f"{source}: {peft_type} config fields peftjax cannot honour: "
            + "; ".join(bad)
        )
    return peft_type


def alpha_for(s: float, rank: int, rslora: bool) -> float | int:
    """The shortest decimal ``lora_alpha`` giving scaling ``s`` in float32.

    Args:
      s: the float32 scaling the adapter uses.
      rank: ``r``.
      rslora: ``alpha/√r`` instead of ``alpha/r``.

    Returns:
      An int when the alpha is integral, else a float.

    Example:
      >>> import numpy as np
      >>> alpha_for(float(np.float32(16 / math.sqrt(8))), 8, True)
      16
      >>> alpha_for(2.0, 8, False)
      16
    """
    denom = math.sqrt(rank) if rslora else rank
    target = np.float32(s)
    raw = s * denom
    for digits in range(1, 18):
        cand = float(f"{raw:.{digits}g}")
        if np.float32(cand / denom) == target:
            return int(cand) if cand.is_integer() else cand
    return raw


def most_common(values: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A config value and its pattern: the most common value of ``{module: value}``
    (the first such in order on a tie) and ``{module: value}`` for the others.

    Args:
      values: ``{full module name: value}``.

    Returns:
      ``(common, {module: value})`` for ``r``/``rank_pattern`` and the like
      (full names match as ``pattern_value`` reads them).

    Example:
      >>> most_common({"a.q": 4, "a.v": 4, "a.d": 2})
      (4, {'a.d': 2})
    """
    counts: dict[Any, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    order = list(values.values())
    common = max(counts, key=lambda v: (counts[v], -order.index(v)))
    return common, {m: v for m, v in sorted(values.items()) if v != common}


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


def selection(config: Mapping[str, Any], key_map: Mapping[str, Any], source: str,
              output_modules: Sequence[str] | None) -> _peft_targets.Selection:
    r"""The modules of ``key_map`` that PEFT adapts under ``config``, and why not.

    PEFT's ``check_target_module_exists`` (see ``peftjax.io.peft_target_modules``):
    ``target_modules`` (a str is a regex matched in full, ``"all-linear"``
    every Linear but ``output_modules``, a list matches exact names or
    ``.``-suffixes), then ``layers_to_transform`` / ``layers_pattern`` for a
    list, minus ``exclude_modules`` and modules under ``modules_to_save``.

    Args:
      config: the checked ``adapter_config.json`` (``check_config``).
      key_map: the unrolled key map.
      source: the file, for error messages.
      output_modules: the output heads ``"all-linear"`` leaves out; None when
        the caller did not say (then ``"all-linear"`` is an error).

    Returns:
      A ``Selection(selected, left_out)``.

    Raises:
      ValueError: no ``target_modules``, ``"all-linear"`` without
        ``output_modules``, or a selection PEFT refuses (nothing selected, a
        norm or container selected, layer fields with a regex), naming the file.

    Example:
      >>> from peftjax.io import PeftKey, TensorLayout
      >>> km = {f"l/{i}/{n}": PeftKey(f"m.l.{i}.{n}", "weight", TensorLayout.KERNEL)
      ...       for i in range(2) for n in "qk"}
      >>> s = selection({"target_modules": ["q", "k"], "exclude_modules": r".*1\.k",
      ...                "layers_to_transform": [1]}, km, "cfg.json", None)
      >>> s.selected, s.left_out["m.l.0.q"]
      (['m.l.1.q'], 'layers_to_transform=[1] (layers_pattern=None) leaves out its layer 0')
    """
    target = config.get("target_modules")
    if target is None:
        raise ValueError(
            f"{source}: no target_modules; PEFT would take its default for the base "
            "model's model_type, which a key map does not know: write the module "
            "names into the file")
    if (isinstance(target, str) and target.lower() == _peft_targets.ALL_LINEAR
            and output_modules is None):
        raise ValueError(
            f"{source}: target_modules={target!r} selects every Linear module except "
            "the model's output head, which a key map does not name: pass "
            "output_modules=('lm_head',) (the head modules; () for none)")
    try:
        return _peft_targets.select_modules(
            target, key_map, exclude_modules=config.get("exclude_modules"),
            modules_to_save=config.get("modules_to_save"),
            layers_to_transform=config.get("layers_to_transform"),
            layers_pattern=config.get("layers_pattern"),
            output_modules=tuple(output_modules or ()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from e


def unused_pattern_keys(config: Mapping[str, Any], selected: Sequence[str]
                        ) -> list[str]:
    """``rank_pattern`` / ``alpha_pattern`` keys that match no selected module.

    PEFT warns about these and ignores them (``inject_adapter``).

    Example:
      >>> unused_pattern_keys({"rank_pattern": {"q": 4, "zz": 2}}, ["l.0.q"])
      ['rank_pattern: zz']
    """
    out = []
    for field in ("rank_pattern", "alpha_pattern"):
        for key in config.get(field) or {}:
            if not any(re.match(rf"(.*\.)?({key})$", m) for m in selected):
                out.append(f"{field}: {key}")
    return out


def is_feedforward(config: Mapping[str, Any], module: str) -> bool:
    """Whether (IA)³ scales ``module``'s input (a feed-forward module).

    A str ``feedforward_modules`` is a regex matched in full; a list matches by
    plain ``str.endswith``, with no ``.`` boundary (PEFT's
    ``_check_target_module_feedforward``).

    Args:
      config: the checked ``adapter_config.json``.
      module: the full module name.

    Returns:
      True for a feed-forward module.

    Example:
      >>> is_feedforward({"feedforward_modules": ["n_proj"]}, "l.0.mlp.down_proj")
      True
      >>> is_feedforward({"feedforward_modules": r".*\\.up"}, "l.0.mlp.down_proj")
      False
    """
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(m) for m in ff)

