# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT X-LoRA directories (``peft_type`` ``XLORA``) both ways.

X-LoRA is a model hook with a classifier (``adapters.XLoraHook``,
``adapters.xlora_forward``), not a per-module weight tuner, so this is a
reader/writer of its own (the ``Tuner`` plug-in of ``load_peft`` builds one
weight-space adapter per module). PEFT's layout: ``adapter_config.json``
(``XLORA``, with ``adapters``: expert name -> path), ``adapter_model.safetensors``
with the classifier (``base_model.internal_xlora_classifier.layers.<i>.weight``
``(out, in)`` and ``.bias``; ``<i>`` indexes PEFT's ``nn.Sequential``, ReLU
and dropout in between), and the experts as plain LoRA directories, one
subfolder per expert named by its key. The experts' paths are read relative
to the directory (PEFT resolves them from the working directory; it needs
the expert names ``"0"``, ``"1"``, ...).

Exports: ``load_peft_xlora``, ``save_peft_xlora``.
"""

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _json, _peft_poly, _safetensors

_CLF = "base_model.internal_xlora_classifier.layers."
_LORA_REFUSED = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
                 "bias": "none", "fan_in_fan_out": False, "lora_bias": False,
                 "layer_replication": None, "use_qalora": False}


def _expert(d: pathlib.Path, sites: dict, n_layers: int) -> dict:
    cfg = _json.read_json(d / "adapter_config.json", "load_peft_xlora")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"load_peft_xlora: expert {d}: peft_type={cfg.get('peft_type')!r}"
                         ", expected 'LORA'")
    for k, want in _LORA_REFUSED.items():
        if cfg.get(k, want) not in (want, None) and not (want == {} and not cfg.get(k)):
            raise ValueError(f"load_peft_xlora: expert {d}: config {k}={cfg[k]!r} is "
                             "not supported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
    arrays, _ = _safetensors.read_safetensors(d / "adapter_model.safetensors")
    out, used = {}, set()
    for (site, i), module in sites.items():
        ka = f"base_model.model.{module}.lora_A.weight"
        kb = f"base_model.model.{module}.lora_B.weight"
        if ka in arrays:
            out[(site, i)] = (arrays[ka].T, arrays[kb].T, scale)
            used.update((ka, kb))
    extra = sorted(set(arrays) - used)
    if extra:
        raise ValueError(f"load_peft_xlora: expert {d}: tensors of no supported "
                         f"module: {extra[:3]}")
    return out


def load_peft_xlora(directory: str | os.PathLike, key_map: Mapping[str, Any], *,
                    dtype: Any = jnp.float32) -> tuple[
                        _adapters.XLoraClassifier, _adapters.XLoraExperts, _adapters.XLoraConfig]:
    """Reads a PEFT X-LoRA directory and its experts.

    Args:
      directory: the X-LoRA directory.
      key_map: the model's (``llama.peft_key_map(cfg)``).
      dtype: of the arrays.

    Returns:
      ``(classifier, experts, config)`` for ``adapters.xlora_forward``.

    Raises:
      ValueError: not an XLORA file, an expert that is not a plain LoRA, a
        classifier that disagrees with the config, or modules adapted in
        some layers only.

    Example:
      >>> import tempfile, jax
      >>> from peftjax import adapters
      >>> from peftjax.models import llama
      >>> from peftjax.models.llama import _tiny
      >>> mc = _tiny.tiny_config(num_hidden_layers=1)
      >>> d = mc.hidden_size
      >>> cfg = adapters.XLoraConfig(n_experts=2, sites=("self_attn/q_proj",),
      ...                            n_layers=1, hidden_size=d)
      >>> ex = adapters.XLoraExperts({"self_attn/q_proj": jnp.ones((1, 2, d, 1))},
      ...                            {"self_attn/q_proj": jnp.ones((1, 2, 1, d))},
      ...                            {"self_attn/q_proj": jnp.ones((2,))})
      >>> clf = adapters.xlora_init(jax.random.key(0), cfg)
      >>> out = save_peft_xlora(tempfile.mkdtemp(), clf, ex, cfg, llama.peft_key_map(mc))
      >>> sorted(p.name for p in out.iterdir())
      ['0', '1', 'adapter_config.json', 'adapter_model.safetensors']
      >>> load_peft_xlora(out, llama.peft_key_map(mc))[2] == cfg
      True
    """
    d = pathlib.Path(directory)
    cfg = _json.read_json(d / "adapter_config.json", "load_peft_xlora")
    if cfg.get("peft_type") != "XLORA":
        raise ValueError(f"load_peft_xlora: {d}: peft_type={cfg.get('peft_type')!r}, "
                         "expected 'XLORA'")
    if cfg.get("use_trainable_adapters"):
        raise ValueError(f"load_peft_xlora: {d}: use_trainable_adapters=True is not "
                         "supported (peftjax's experts are frozen)")
    names = list(cfg["adapters"])
    sites = _peft_poly.sites_of(key_map)
    n_layers = 1 + max(i for _, i in sites)
    experts = []
    for n in names:
        p = d / n if (d / n / "adapter_config.json").is_file() else pathlib.Path(
            cfg["adapters"][n])
        experts.append(_expert(p, sites, n_layers))
    used = sorted({s for e in experts for s, _ in e},
                  key=lambda s: _adapters.XLORA_SITE_ORDER.index(s))
    for s in used:
        have = {i for e in experts for (t, i) in e if t == s}
        if have != set(range(n_layers)):
            raise ValueError(f"load_peft_xlora: {d}: {s} is adapted in layers "
                             f"{sorted(have)} only; X-LoRA here needs every layer")
    rmax = max(a.shape[1] for e in experts for a, _, _ in e.values())
    a_out, b_out, s_out = {}, {}, {}
    for s in used:
        sh = next((a.shape[0], b.shape[1]) for e in experts for (t, _), (a, b, _)
                  in e.items() if t == s)
        a = np.zeros((n_layers, len(experts), sh[0], rmax), np.float32)
        b = np.zeros((n_layers, len(experts), rmax, sh[1]), np.float32)
        sc = np.zeros((len(experts),), np.float32)
        for k, e in enumerate(experts):
            for i in range(n_layers):
                if (s, i) in e:
                    ea, eb, es = e[(s, i)]
                    a[i, k, :, : ea.shape[1]] = ea
                    b[i, k, : eb.shape[0], :] = eb
                    sc[k] = es
        a_out[s], b_out[s], s_out[s] = (jnp.asarray(a, dtype), jnp.asarray(b, dtype),
                                        jnp.asarray(sc, dtype))
    xcfg = _adapters.XLoraConfig(
        n_experts=len(names), sites=tuple(used), n_layers=n_layers,
        hidden_size=int(cfg["hidden_size"]), xlora_depth=int(cfg["xlora_depth"]),
        xlora_size=int(cfg["xlora_size"]),
        layerwise_scalings=bool(cfg["layerwise_scalings"]),
        enable_softmax=bool(cfg["enable_softmax"]),
        softmax_temperature=float(cfg["softmax_temperature"]),
        top_k_lora=cfg.get("top_k_lora"),
        enable_softmax_topk=bool(cfg["enable_softmax_topk"]),
        scaling_pass_value=float(cfg["scaling_pass_value"]),
        global_scaling_weight=float(cfg["global_scaling_weight"]))
    arrays, _ = _safetensors.read_safetensors(d / "adapter_model.safetensors")
    idx = sorted({int(k[len(_CLF):].split(".")[0]) for k in arrays if k.startswith(_CLF)})
    # PEFT's Sequential: Linear at 0, then (ReLU, [Dropout], Linear) per layer
    want = xcfg.xlora_depth
    if len(idx) != want or len(arrays) != 2 * want:
        raise ValueError(f"load_peft_xlora: {d}: classifier layers {idx} (of "
                         f"{sorted(arrays)[:4]}...) disagree with xlora_depth={want}")
    layers = tuple((jnp.asarray(arrays[f"{_CLF}{i}.weight"].T, dtype),
                    jnp.asarray(arrays[f"{_CLF}{i}.bias"], dtype)) for i in idx)
    ref = _adapters.xlora_init(_key0(), xcfg)
    for (w, _), (rw, _) in zip(layers, ref.layers, strict=True):
        if w.shape != rw.shape:
            raise ValueError(f"load_peft_xlora: {d}: classifier kernel {w.shape}, "
                             f"expected {rw.shape} from the config")
    return _adapters.XLoraClassifier(layers), _adapters.XLoraExperts(a_out, b_out, s_out), xcfg


def _key0():
    import jax

    return jax.random.key(0)


def save_peft_xlora(directory: str | os.PathLike, classifier: _adapters.XLoraClassifier,
                    experts: _adapters.XLoraExperts, config: _adapters.XLoraConfig,
                    key_map: Mapping[str, Any], *, xlora_dropout_p: float = 0.2,
                    base_model_name_or_path: str | None = None) -> pathlib.Path:
    """Writes a PEFT X-LoRA directory (classifier + one LoRA subfolder per expert).

    Experts are written with the padded rank ``r`` and ``lora_alpha = s·r``
    (their scaling ``s`` must be the same at every site). PEFT 0.21.2 loads
    the directory when run from inside it (the config's ``adapters`` are the
    subfolder names).

    Args:
      directory: created if needed.
      classifier, experts, config: the X-LoRA parts.
      key_map: the model's.
      xlora_dropout_p: recorded (training-time dropout of the classifier).
      base_model_name_or_path: recorded.

    Returns:
      The directory.

    Example: see ``load_peft_xlora``.
    """
    out = pathlib.Path(directory)
    sites = _peft_poly.sites_of(key_map)
    names = [str(k) for k in range(config.n_experts)]
    for k, n in enumerate(names):
        tensors, mods, scales = {}, set(), set()
        for s in config.sites:
            sc = float(experts.scaling[s][k])
            if sc == 0.0:
                continue
            scales.add(round(sc, 6))
            a, b = np.asarray(experts.lora_a[s]), np.asarray(experts.lora_b[s])
            r = a.shape[-1]
            for i in range(config.n_layers):
                m = sites[(s, i)]
                mods.add(m.rsplit(".", 1)[-1])
                tensors[f"base_model.model.{m}.lora_A.weight"] = np.ascontiguousarray(
                    a[i, k].T, np.float32)
                tensors[f"base_model.model.{m}.lora_B.weight"] = np.ascontiguousarray(
                    b[i, k].T, np.float32)
        if len(scales) != 1:
            raise ValueError(f"save_peft_xlora: expert {k} has scalings {sorted(scales)} "
                             "across sites; PEFT's LoRA file holds one alpha/r")
        r = next(iter(experts.lora_a.values())).shape[-1]
        lcfg = {"peft_type": "LORA", "task_type": None, "r": int(r),
                "lora_alpha": scales.pop() * r, "use_rslora": False,
                "target_modules": sorted(mods), "lora_dropout": 0.0, "bias": "none",
                "fan_in_fan_out": False, "init_lora_weights": True,
                "base_model_name_or_path": base_model_name_or_path,
                "inference_mode": True, "use_dora": False, "rank_pattern": {},
                "alpha_pattern": {}, "modules_to_save": None}
        (out / n).mkdir(parents=True, exist_ok=True)
        (out / n / "adapter_config.json").write_text(
            json.dumps(lcfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _safetensors.write_safetensors(out / n / "adapter_model.safetensors", tensors,
                                       metadata={"format": "pt"})
    cfg = {"peft_type": "XLORA", "task_type": "CAUSAL_LM",
           "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
           "adapters": {n: n for n in names}, "hidden_size": config.hidden_size,
           "xlora_depth": config.xlora_depth, "xlora_size": config.xlora_size,
           "layerwise_scalings": config.layerwise_scalings,
           "enable_softmax": config.enable_softmax,
           "softmax_temperature": config.softmax_temperature,
           "top_k_lora": config.top_k_lora,
           "enable_softmax_topk": config.enable_softmax_topk,
           "scaling_pass_value": config.scaling_pass_value,
           "global_scaling_weight": config.global_scaling_weight,
           "xlora_dropout_p": xlora_dropout_p, "use_trainable_adapters": False,
           "revision": None}
    (out / "adapter_config.json").write_text(
        json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # PEFT's Sequential indices: Linear, ReLU, [Dropout], Linear, ...
    step = 3 if xlora_dropout_p > 0 else 2
    tensors = {}
    for j, (w, b) in enumerate(classifier.layers):
        tensors[f"{_CLF}{j * step}.weight"] = np.ascontiguousarray(np.asarray(w).T,
                                                                   np.float32)
        tensors[f"{_CLF}{j * step}.bias"] = np.asarray(b, np.float32)
    _safetensors.write_safetensors(out / "adapter_model.safetensors", tensors,
                                   metadata={"format": "pt"})
    return out
