# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT Poly files (``peft_type`` ``POLY``) both ways.

Poly is a model hook (``adapters.PolyHook``), not a weight-space adapter,
so the per-module ``Tuner`` plug-in of ``load_peft``/``save_peft`` (which
builds an ``(adapter, trainable, frozen)`` per module) cannot express it;
these are a small reader and writer of their own. Tensors per adapted
module ``base_model.model.<module>.``: ``poly_lora_A (n_splits, n_skills,
in/n_splits, r)``, ``poly_lora_B (n_splits, n_skills, r, out/n_splits)``,
``poly_router.module_logits (n_tasks, n_splits·n_skills)`` (no layout change:
PEFT's ``x @ A @ B`` already is the Flax orientation).

Exports: ``load_peft_poly``, ``save_peft_poly``, ``sites_of``.
"""

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _json, _safetensors

_PREFIX = "base_model.model."
_REFUSED = {"poly_type": "poly", "modules_to_save": None, "exclude_modules": None}


def sites_of(key_map: Mapping[str, Any]) -> dict[tuple[str, int], str]:
    """``{(site, layer): PEFT module}`` from a model's key map (``layers/<i>/<site>/kernel``)."""
    out = {}
    for path, key in key_map.items():
        m = re.fullmatch(r"layers/(\d+)/(.+)/kernel", path)
        if m:
            out[(m.group(2), int(m.group(1)))] = key.module
    return out


def load_peft_poly(directory: str | os.PathLike, key_map: Mapping[str, Any], *,
                   dtype: Any = jnp.float32) -> tuple[_adapters.PolyParams, dict]:
    """Reads a PEFT Poly adapter.

    Args:
      directory: with ``adapter_config.json`` and ``adapter_model.safetensors``.
      key_map: the model's (``llama.peft_key_map(cfg)``, ``bert.peft_key_map(cfg)``).
      dtype: of the parameters.

    Returns:
      ``(PolyParams, config)``; build the hook with
      ``adapters.PolyHook(params, task_ids)``.

    Raises:
      ValueError: not a POLY file, a config field peftjax does not honour, a
        module adapted in some layers only, or a tensor of the wrong shape.

    Example:
      >>> import tempfile, jax
      >>> from peftjax import adapters
      >>> from peftjax.models import llama
      >>> from peftjax.models.llama import _tiny
      >>> cfg = _tiny.tiny_config(num_hidden_layers=1)
      >>> params = {"layers": [{"mlp": {"up_proj": {"kernel": jnp.zeros(
      ...     (cfg.hidden_size, cfg.intermediate_size))}}}]}
      >>> pp = adapters.poly_init(jax.random.key(0), params, target_modules=["up_proj"],
      ...                         r=2, n_tasks=3, n_skills=2)
      >>> d = save_peft_poly(tempfile.mkdtemp(), pp, llama.peft_key_map(cfg))
      >>> back, config = load_peft_poly(d, llama.peft_key_map(cfg))
      >>> config["peft_type"], back.module_logits["mlp/up_proj"].shape
      ('POLY', (1, 3, 2))
    """
    d = pathlib.Path(directory)
    cfg = _json.read_json(d / "adapter_config.json", "load_peft_poly")
    if cfg.get("peft_type") != "POLY":
        raise ValueError(f"load_peft_poly: {d}: peft_type={cfg.get('peft_type')!r}, "
                         "expected 'POLY'")
    for k, want in _REFUSED.items():
        if cfg.get(k, want) not in (want, [], {}):
            raise ValueError(f"load_peft_poly: {d}: config {k}={cfg[k]!r} is not "
                             f"supported (only {want!r})")
    arrays, _ = _safetensors.read_safetensors(d / "adapter_model.safetensors")
    sites = sites_of(key_map)
    n_layers = 1 + max(i for _, i in sites)
    a, b, z = {}, {}, {}
    used = set()
    for site in sorted({s for s, _ in sites}):
        names = [_PREFIX + sites[(site, i)] for i in range(n_layers)]
        have = [f"{n}.poly_lora_A" in arrays for n in names]
        if not any(have):
            continue
        if not all(have):
            raise ValueError(f"load_peft_poly: {d}: {site} is adapted in layers "
                             f"{[i for i, h in enumerate(have) if h]} only; PolyHook "
                             "needs every layer")
        for store, suf in ((a, "poly_lora_A"), (b, "poly_lora_B"),
                           (z, "poly_router.module_logits")):
            ks = [f"{n}.{suf}" for n in names]
            missing = [k for k in ks if k not in arrays]
            if missing:
                raise ValueError(f"load_peft_poly: {d}: missing tensor {missing[0]}")
            shapes = {arrays[k].shape for k in ks}
            if len(shapes) != 1:
                raise ValueError(f"load_peft_poly: {d}: {site}.{suf} shapes differ "
                                 f"across layers {sorted(shapes)}")
            store[site] = jnp.asarray(np.stack([arrays[k] for k in ks]), dtype)
            used.update(ks)
        q, s, _, r = a[site].shape[1:]
        if (q, s, r) != (cfg["n_splits"], cfg["n_skills"], cfg["r"]) or \
                z[site].shape[1:] != (cfg["n_tasks"], q * s):
            raise ValueError(f"load_peft_poly: {d}: {site} shapes {a[site].shape[1:]}, "
                             f"{z[site].shape[1:]} disagree with the config's r, "
                             "n_splits, n_skills, n_tasks")
    extra = sorted(set(arrays) - used)
    if extra:
        raise ValueError(f"load_peft_poly: {d}: tensors of no adapted module: {extra[:3]}")
    if not a:
        raise ValueError(f"load_peft_poly: {d}: no Poly tensors for this model")
    return _adapters.PolyParams(a, b, z), cfg


def save_peft_poly(directory: str | os.PathLike, params: _adapters.PolyParams,
                   key_map: Mapping[str, Any], *,
                   base_model_name_or_path: str | None = None) -> pathlib.Path:
    """Writes ``PolyParams`` as a PEFT Poly adapter (``PeftModel.from_pretrained`` loads it).

    Args:
      directory: created if needed.
      params: ``PolyParams``.
      key_map: the model's.
      base_model_name_or_path: recorded in the config.

    Returns:
      The directory.

    Example: see ``load_peft_poly``.
    """
    sites = sites_of(key_map)
    tensors, modules = {}, set()
    first = next(iter(params.lora_a.values()))
    n_layers, q, s, _, r = first.shape
    n_tasks = next(iter(params.module_logits.values())).shape[1]
    for site in sorted(params.lora_a):
        if (site, 0) not in sites:
            raise ValueError(f"save_peft_poly: site {site!r} is not in the key map")
        if params.lora_a[site].shape[:3] != (n_layers, q, s) or \
                params.lora_a[site].shape[4] != r:
            raise ValueError(f"save_peft_poly: {site}: lora_a shape "
                             f"{params.lora_a[site].shape} disagrees with {first.shape}")
        for i in range(n_layers):
            name = _PREFIX + sites[(site, i)]
            modules.add(sites[(site, i)].rsplit(".", 1)[-1])
            tensors[f"{name}.poly_lora_A"] = np.asarray(params.lora_a[site][i], np.float32)
            tensors[f"{name}.poly_lora_B"] = np.asarray(params.lora_b[site][i], np.float32)
            tensors[f"{name}.poly_router.module_logits"] = np.asarray(
                params.module_logits[site][i], np.float32)
    config = {
        "peft_type": "POLY", "task_type": None, "base_model_name_or_path":
        base_model_name_or_path, "inference_mode": True, "init_weights": True,
        "poly_type": "poly", "r": int(r), "n_tasks": int(n_tasks),
        "n_skills": int(s), "n_splits": int(q), "target_modules": sorted(modules),
        "exclude_modules": None, "modules_to_save": None, "revision": None,
    }
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _safetensors.write_safetensors(out / "adapter_model.safetensors", tensors,
                                   metadata={"format": "pt"})
    return out
