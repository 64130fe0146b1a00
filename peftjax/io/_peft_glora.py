# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``GLORA`` tensors and config, per module.

PEFT (``tuners/glora``) stores, per Linear module, one entry per path
``glora_<P>`` (``P`` in ``A`` ... ``E``): ``Xd``/``Xu`` for a lora path
(``A``/``B``: ``Xd (out, r)``, ``Xu (r, in)``; ``C``: ``Xd (in, r)``, ``Xu
(r, 1)``), ``X`` for a vector (``A``/``B``: ``(out, 1)``, ``C``: ``(in,
1)``, ``D``/``E``: ``(out,)``) or a constant (``(1,)``), and, for a path
left empty (config ``none``, or ``C``/``D``/``E`` on a layer without a
bias), its ``zeros`` buffer (``A``/``B``: ``(out, in)``, ``C``: ``(in,
1)``, ``D``/``E``: ``(out,)``). peftjax's ``GLoRAParams``: ``a_in =
Xuᵀ``, ``a_out = Xdᵀ`` (same for ``b``), ``c_in = Xd``, ``c_out = Xu[:,
0]``, vectors without their unit axis; a ``zeros`` path is None (and is
written back as PEFT's zeros). Config: ``r``, ``config_A_B``,
``config_C``, ``config_D_E`` and ``init_weights`` are honoured; ``bias``
only at its default. A module whose ``C``/``D``/``E`` are ``zeros`` loads
with that path ``none`` (PEFT's empty path on a layer without a bias); on
writing, modules whose ``C`` (or ``D``/``E``) is ``none`` beside others
configured must be such layers, as in PEFT.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_PATHS = ("A", "B", "C", "D", "E")
_SUFFIXES = tuple(f"glora_{p}.{n}" for p in _PATHS for n in ("Xd", "Xu", "X", "zeros"))


def _kind(found: set[str], p: str) -> str:
    if f"glora_{p}.Xd" in found or f"glora_{p}.Xu" in found:
        return "lora"
    return "vector" if f"glora_{p}.X" in found else "none"


def _required(found: set[str]) -> set[str]:
    """Per path ``Xd`` and ``Xu``, or ``X``, or ``zeros``."""
    names = {"lora": ("Xd", "Xu"), "vector": ("X",), "none": ("zeros",)}
    return {f"glora_{p}.{n}" for p in _PATHS for n in names[_kind(found, p)]}


def _host(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    got, n_in, n_out = m.tensors, m.dims.n_in, m.dims.n_out
    cfg = {"config_A_B": m.config.get("config_A_B", "lora"),
           "config_C": m.config.get("config_C", "lora"),
           "config_D_E": m.config.get("config_D_E", "constant")}
    r = m.config.get("r", 8)

    def bad(p, what):
        return ValueError(f"load_peft: {m.module!r} has glora_{p} "
                          f"{ {k: v.shape for k, v in got.items() if k.startswith(f'glora_{p}.')} }"
                          f"; expected {what} ({m.source})")

    def arr(x):
        return jnp.asarray(x, m.dtype)

    kinds = {p: _kind(set(got), p) for p in _PATHS}
    t: dict[str, Any] = {}
    # A and B: one config for both (lora, a vector/constant X, or zeros).
    ab = cfg["config_A_B"]
    for p in ("A", "B"):
        name = p.lower()
        want = {"lora": "lora", "vector": "vector", "constant": "vector"}.get(ab, "none")
        if kinds[p] != want:
            raise bad(p, f"the {ab!r} path of config_A_B")
        if ab == "lora":
            xd, xu = got[f"glora_{p}.Xd"], got[f"glora_{p}.Xu"]
            if xd.shape != (n_out, r) or xu.shape != (r, n_in):
                raise bad(p, f"Xd (out={n_out}, r={r}) and Xu (r, in={n_in}) (r)")
            t[name + "_in"], t[name + "_out"] = arr(xu.T), arr(xd.T)
        elif ab in ("vector", "constant"):
            x = got[f"glora_{p}.X"]
            shape = (n_out, 1) if ab == "vector" else (1,)
            if x.shape != shape:
                raise bad(p, f"X {shape} ({ab})")
            t[name] = arr(x.reshape(-1))
        elif got[f"glora_{p}.zeros"].shape != (n_out, n_in):
            raise bad(p, f"zeros (out={n_out}, in={n_in})")
    # C: lora, vector, or zeros (config none, or PEFT's empty path without a bias).
    c = cfg["config_C"] if kinds["C"] != "none" else "none"
    if kinds["C"] != "none" and kinds["C"] != cfg["config_C"]:
        raise bad("C", f"the {cfg['config_C']!r} path of config_C")
    if c == "lora":
        xd, xu = got["glora_C.Xd"], got["glora_C.Xu"]
        if xd.shape != (n_in, r) or xu.shape != (r, 1):
            raise bad("C", f"Xd (in={n_in}, r={r}) and Xu (r, 1) (r)")
        t["c_in"], t["c_out"] = arr(xd), arr(xu[:, 0])
    elif c == "vector":
        if got["glora_C.X"].shape != (n_in, 1):
            raise bad("C", f"X (in={n_in}, 1)")
        t["c"] = arr(got["glora_C.X"][:, 0])
    elif got["glora_C.zeros"].shape != (n_in, 1):
        raise bad("C", f"zeros (in={n_in}, 1)")
    # D and E: vector, constant, or zeros; both the same.
    if kinds["D"] != kinds["E"]:
        raise bad("E", "the path kind of glora_D")
    de = cfg["config_D_E"] if kinds["D"] != "none" else "none"
    if kinds["D"] != "none" and cfg["config_D_E"] == "none":
        raise bad("D", "zeros (config_D_E)")
    for p in ("D", "E"):
        if de == "none":
            if got[f"glora_{p}.zeros"].shape != (n_out,):
                raise bad(p, f"zeros (out={n_out},)")
            continue
        shape = (n_out,) if de == "vector" else (1,)
        if got[f"glora_{p}.X"].shape != shape:
            raise bad(p, f"X {shape} ({de})")
        t[p.lower()] = arr(got[f"glora_{p}.X"])
    adapter = _adapters.glora(
        r, config_A_B=ab, config_C=c, config_D_E=de,
        init_weights=bool(m.config.get("init_weights", True)), param_dtype=m.dtype,
        dimension_numbers=m.dimension_numbers)
    return adapter, _adapters.GLoRAParams(**t), None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "config_A_B" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.glora adapter")
    t, n_in, n_out = m.trainable, m.dims.n_in, m.dims.n_out
    dt = np.dtype(next(x for x in jax.tree.leaves(t)).dtype) if jax.tree.leaves(t) \
        else np.dtype(np.float32)
    out: dict[str, np.ndarray] = {}
    for p in ("A", "B"):
        name = p.lower()
        if getattr(t, name + "_in") is not None:
            out[f"glora_{p}.Xd"] = _peft_tuner.transposed(getattr(t, name + "_out"))
            out[f"glora_{p}.Xu"] = _peft_tuner.transposed(getattr(t, name + "_in"))
        elif getattr(t, name) is not None:
            x = _host(getattr(t, name))
            out[f"glora_{p}.X"] = x.reshape(-1, 1) if hp["config_A_B"] == "vector" else x
        else:
            out[f"glora_{p}.zeros"] = np.zeros((n_out, n_in), dt)
    if t.c_in is not None:
        out["glora_C.Xd"] = _host(t.c_in)
        out["glora_C.Xu"] = _host(t.c_out).reshape(-1, 1)
    elif t.c is not None:
        out["glora_C.X"] = _host(t.c).reshape(-1, 1)
    else:
        out["glora_C.zeros"] = np.zeros((n_in, 1), dt)
    for p in ("D", "E"):
        x = getattr(t, p.lower())
        out[f"glora_{p}." + ("zeros" if x is None else "X")] = (
            np.zeros((n_out,), dt) if x is None else _host(x))
    return out, (hp["rank"], hp["config_A_B"], hp["config_C"], hp["config_D_E"],
                 hp["init_weights"])


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    def one(i, field, allow_none):
        vals = {v[i] for v in infos.values()}
        if allow_none and len(vals) > 1:  # "none" there: layers without a bias
            vals.discard("none")
        if len(vals) > 1:
            raise ValueError(f"save_peft: one PEFT GLoRA adapter has one {field}; got "
                             f"{sorted(map(str, vals))}")
        return vals.pop()

    return {"r": one(0, "r", False), "config_A_B": one(1, "config_A_B", False),
            "config_C": one(2, "config_C", True),
            "config_D_E": one(3, "config_D_E", True),
            "init_weights": one(4, "init_weights", False), "bias": "none"}, {}


def _one_of(*choices: str):
    return (lambda v: v in choices), "one of " + ", ".join(choices)


TUNER = _peft_tuner.Tuner(
    peft_type="GLORA",
    params_types=(_adapters.GLoRAParams,),
    suffixes=_SUFFIXES,
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "config_A_B", "config_C", "config_D_E", "init_weights",
                        "layers_to_transform", "layers_pattern"}),
    defaults={"bias": "none"},
    field_types={
        "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "a positive integer"),
        "config_A_B": _one_of("lora", "vector", "constant", "none"),
        "config_C": _one_of("lora", "vector", "none"),
        "config_D_E": _one_of("vector", "constant", "none"),
        "init_weights": (lambda v: isinstance(v, bool), "true or false"),
    },
    required=_required,
)
