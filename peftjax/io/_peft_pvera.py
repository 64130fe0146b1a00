# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``PVERA`` tensors and config, per module.

PEFT (``tuners/pvera``) stores ``pvera_lambda_d`` ``(2r,)`` and
``pvera_lambda_b`` ``(out,)`` per Linear module (``peftjax.adapters.
PVeRAParams``' layout) and the shared ``base_model.pvera_A`` ``(2r, in_max)``
/ ``base_model.pvera_B`` ``(out_max, r)`` (peftjax holds their transposes
once, in ``AdapterState.frozen["@shared"]``).

The projections must be in the file (``save_projection=True``, PEFT's
default): PEFT would otherwise regenerate them with torch's generator, which
peftjax cannot reproduce, so ``save_projection=False`` is refused;
``save_peft`` always writes them, sliced to the largest written widths (the
shapes PEFT computes). Config: ``r``, ``projection_prng_key``, ``d_initial``
and ``init_weights`` (inert once trained), ``pvera_dropout`` are honoured,
``generator_seed`` is inert (it seeds PEFT's sampling only); PEFT's
evaluation uses the mean, as peftjax does, so ``sample_at_inference`` is
accepted only at its default False; ``fan_in_fan_out`` and ``bias`` only at
their defaults.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_SUFFIXES = ("pvera_lambda_b", "pvera_lambda_d")
_SHARED = ("base_model.pvera_A", "base_model.pvera_B")
_NAME = "pvera"


def _shared_matrices(shared: Mapping[str, np.ndarray], source: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(A (2r, in_max), B (out_max, r))``, checked."""
    if set(shared) != set(_SHARED):
        raise ValueError(f"load_peft: the PVeRA file of {source} lacks "
                         f"{sorted(set(_SHARED) - set(shared))} (has {sorted(shared)}); "
                         "save it with save_projection=True")
    a, b = shared[_SHARED[0]], shared[_SHARED[1]]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != 2 * b.shape[1]:
        raise ValueError(f"load_peft: base_model.pvera_A {a.shape} / pvera_B {b.shape} "
                         f"in {source} are not (2r, in_max) / (out_max, r)")
    return a, b


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    a, b = _shared_matrices(m.shared, m.source)
    r = int(m.config.get("r", 256))
    if b.shape[1] != r:
        raise ValueError(f"load_peft: base_model.pvera_B {b.shape} has rank {b.shape[1]} "
                         f"but r={r} in {m.source}")
    lam_d, lam_b = m.tensors["pvera_lambda_d"], m.tensors["pvera_lambda_b"]
    if lam_d.shape != (2 * r,) or lam_b.shape != (m.dims.n_out,):
        raise ValueError(f"load_peft: {m.module!r} (in={m.dims.n_in}, out="
                         f"{m.dims.n_out}) has pvera_lambda_d {lam_d.shape} / "
                         f"pvera_lambda_b {lam_b.shape}; r={r} ({m.source}) needs "
                         f"({2 * r},) / ({m.dims.n_out},)")
    adapter = _adapters.pvera(
        r, max_in=int(a.shape[1]), max_out=int(b.shape[0]),
        projection_seed=int(m.config.get("projection_prng_key", 0)),
        d_initial=float(m.config.get("d_initial", 0.1)), shared_name=_NAME,
        dropout=float(m.config.get("pvera_dropout", 0.0)),
        dimension_numbers=m.dimension_numbers, param_dtype=m.dtype)
    placeholders = _adapters.PVeRABasis(a=_adapters.Shared(f"{_NAME}_A"),
                                        b=_adapters.Shared(f"{_NAME}_B"))
    return (adapter, _adapters.PVeRAParams(jnp.asarray(lam_d, m.dtype),
                                           jnp.asarray(lam_b, m.dtype)), placeholders)


def _shared_frozen(shared: Mapping[str, np.ndarray], config: Mapping[str, Any],
                   dtype: Any) -> dict[str, Any]:
    a, b = _shared_matrices(shared, "the config")
    return {_adapters.SHARED: {f"{_NAME}_A": jnp.asarray(a.T, dtype),
                               f"{_NAME}_B": jnp.asarray(b.T, dtype)}}


def _resolve(x: Any, m: _peft_tuner.ModuleWrite) -> np.ndarray:
    if isinstance(x, _adapters.Shared):
        x = m.state.frozen.get(_adapters.SHARED, {}).get(x.name)
        if x is None:
            raise ValueError(f"save_peft: the state has no shared PVeRA matrices for "
                             f"{m.path!r}")
    return np.asarray(jax.device_get(x), np.float32)


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "d_initial" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.pvera adapter")
    t = m.trainable
    tensors = {"pvera_lambda_d": np.ascontiguousarray(np.asarray(jax.device_get(
                   t.lambda_d))),
               "pvera_lambda_b": np.ascontiguousarray(np.asarray(jax.device_get(
                   t.lambda_b)))}
    info = (hp["rank"], hp["projection_seed"], hp["d_initial"], m.adapter.dropout,
            (m.dims.n_in, m.dims.n_out), _resolve(m.frozen.a, m), _resolve(m.frozen.b, m))
    return tensors, info


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    """One config; ``pvera_A``/``pvera_B`` sliced to the largest written widths."""
    fields = {i[:4] for i in infos.values()}
    if len(fields) > 1:
        raise ValueError("save_peft: one PEFT PVeRA adapter has one r, "
                         "projection_prng_key, d_initial and dropout; got "
                         f"{sorted(fields, key=repr)}")
    r, seed, d_initial, dropout = fields.pop()
    first = next(iter(infos.values()))
    for module, info in infos.items():
        if not (np.array_equal(info[5], first[5]) and np.array_equal(info[6], first[6])):
            raise ValueError(f"save_peft: {module!r} reads other PVeRA matrices than "
                             "the other modules; one PEFT file holds one pair")
    max_in = max(i[4][0] for i in infos.values())
    max_out = max(i[4][1] for i in infos.values())
    shared = {_SHARED[0]: np.ascontiguousarray(first[5][:max_in].T),
              _SHARED[1]: np.ascontiguousarray(first[6][:, :max_out].T)}
    return {"r": r, "projection_prng_key": seed, "save_projection": True,
            "d_initial": d_initial, "pvera_dropout": dropout, "init_weights": True,
            "sample_at_inference": False, "fan_in_fan_out": False,
            "bias": "none"}, shared


def _check(config: Mapping[str, Any], source: str) -> list[str]:
    if config.get("save_projection") is False:
        return ["save_projection=False (PEFT would regenerate pvera_A/pvera_B with "
                "torch's generator, which peftjax cannot reproduce; save them)"]
    return []


TUNER = _peft_tuner.Tuner(
    peft_type="PVERA",
    params_types=(_adapters.PVeRAParams,),
    suffixes=_SUFFIXES,
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "projection_prng_key", "save_projection", "d_initial",
                        "pvera_dropout", "init_weights", "generator_seed",
                        "layers_to_transform", "layers_pattern"}),
    # peftjax evaluates the mean, as PEFT does unless sample_at_inference.
    defaults={"fan_in_fan_out": False, "bias": "none", "sample_at_inference": False},
    field_types={
        "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "a positive int"),
        "projection_prng_key": (lambda v: isinstance(v, int) and not isinstance(v, bool),
                                "an int"),
        "d_initial": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                      "a number"),
        "pvera_dropout": (lambda v: isinstance(v, (int, float))
                          and not isinstance(v, bool) and 0 <= v < 1, "in [0, 1)"),
    },
    is_shared=lambda key: key in _SHARED,
    check=_check,
    shared_frozen=_shared_frozen,
)
