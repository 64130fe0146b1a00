# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``FROD`` tensors and config, per module.

PEFT (``tuners/frod``) stores, per Linear module, ``frod_lambda_l`` ``(in,)``
and ``frod_lambda_s_values`` ``(nnz,)`` (peftjax's ``FRoDParams``), and per
module category (PEFT's ``_category_from_key``: ``self_attn_q_proj``,
``mlp_down_proj``, ``self_query``, ``attention_output``, ...) the shared
``base_model.frod_V.<category>`` ``(in, in)``,
``base_model.frod_s_indices.<category>`` ``(2, nnz)`` and
``base_model.frod_s_size.<category>`` (``[in, in]``): peftjax's group
``<category>`` (``AdapterState.frozen["@shared"]["<category>/V"]`` and
``"<category>/indices"``). ``U`` is not in the file: PEFT recomputes it from
the base weight in float64 and so does the reader (``FRoDFrozen.u``,
``lambda0``).

The projections must be in the file (``save_projection=True``, PEFT's
default): PEFT would otherwise regenerate ``V`` with its own SVD/eigh signs
and the pattern with torch's generator, so ``save_projection=False`` is
refused. When PEFT loads a file it computes ``U`` from the ``V`` it
regenerates from the base weights, then takes ``V`` and the pattern from the
file: a file peftjax writes loads right in PEFT only with the bases PEFT
regenerates, i.e. adapters whose bases came from a PEFT file. Bases made by
``adapters.init`` differ from torch's (eigen/singular vector signs, and any
basis of a degenerate eigenspace: a square stacked weight makes PEFT's
``T`` a multiple of the identity), and PEFT then mixes its ``U`` with
peftjax's ``V``. Config: ``sparse_rate``,
``regularization_alpha``, ``init_weights`` and ``frod_dropout`` are
honoured; ``fan_in_fan_out``, ``bias``, ``save_projection`` only at their
defaults; ``projection_prng_key``, ``progressbar`` and
``runtime_offload_base_weight`` change nothing once the projections are
saved.

Exports: ``TUNER``.
"""

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_PREFIXES = ("base_model.frod_V.", "base_model.frod_s_indices.", "base_model.frod_s_size.")


def category(module: str) -> str:
    """PEFT's ``_category_from_key``: the role shared by a module's layers."""
    parts = module.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    cat = f"{parts[-2]}_{parts[-1]}"
    if cat == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return cat


def _projection(shared: Mapping[str, np.ndarray], cat: str, source: str
                ) -> tuple[np.ndarray, np.ndarray]:
    keys = [p + cat for p in _PREFIXES]
    missing = [k for k in keys if k not in shared]
    if missing:
        raise ValueError(f"load_peft: the FRoD file of {source} lacks {missing}; save it "
                         "with save_projection=True")
    v, idx, size = (shared[k] for k in keys)
    n = v.shape[0]
    if v.shape != (n, n) or idx.ndim != 2 or idx.shape[0] != 2 or \
            [int(s) for s in size] != [n, n]:
        raise ValueError(f"load_peft: FRoD category {cat!r} in {source} has frod_V "
                         f"{v.shape}, frod_s_indices {idx.shape}, frod_s_size "
                         f"{list(size)}; expected (in, in), (2, nnz), [in, in]")
    return v, idx


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    cat, n_in = category(m.module), m.dims.n_in
    v, idx = _projection(m.shared, cat, m.source)
    lam, s = m.tensors["frod_lambda_l"], m.tensors["frod_lambda_s_values"]
    rate = float(m.config.get("sparse_rate", 0.01))
    nnz = _adapters.frod_nnz(n_in, rate)
    if v.shape[0] != n_in or lam.shape != (n_in,) or s.shape != (nnz,) or \
            idx.shape[1] != nnz:
        raise ValueError(
            f"load_peft: {m.module!r} has frod_lambda_l {lam.shape}, "
            f"frod_lambda_s_values {s.shape} and category {cat!r} frod_V {v.shape}, "
            f"frod_s_indices {idx.shape}; expected (in={n_in},), (nnz={nnz},) from "
            f"sparse_rate={rate} in {m.source}, ({n_in}, {n_in}), (2, {nnz})")
    if m.base is None:
        raise ValueError(f"load_peft: FRoD on {m.module!r} needs the base kernel")
    # PEFT's _calculate_frod_u_and_lambda, in float64 (V in the file's dtype).
    z = np.linalg.solve(np.asarray(v, np.float64), np.asarray(m.base(), np.float64))
    lam0 = np.linalg.norm(z, axis=1)
    keep = lam0 > 1e-12
    u = np.where(keep[:, None], z / np.where(keep, lam0, 1.0)[:, None], 0.0)
    adapter = _adapters.frod(
        rate, group=cat,
        regularization_alpha=float(m.config.get("regularization_alpha", 1e-3)),
        init_weights=bool(m.config.get("init_weights", True)),
        dropout=float(m.config.get("frod_dropout", 0.0)), param_dtype=m.dtype,
        dimension_numbers=m.dimension_numbers)
    frozen = _adapters.FRoDFrozen(
        jnp.asarray(u, m.dtype), jnp.asarray(lam0, m.dtype),
        _adapters.Shared(f"{cat}/V"), _adapters.Shared(f"{cat}/indices"))
    return (adapter, _adapters.FRoDParams(jnp.asarray(lam, m.dtype), jnp.asarray(s, m.dtype)),
            frozen)


def _shared_frozen(shared: Mapping[str, np.ndarray], config: Mapping[str, Any],
                   dtype: Any) -> dict[str, Any]:
    cats = sorted({k[len(p):] for k in shared for p in _PREFIXES if k.startswith(p)})
    out = {}
    for cat in cats:
        v, idx = _projection(shared, cat, "the file")
        out[f"{cat}/V"] = jnp.asarray(v, dtype)
        out[f"{cat}/indices"] = jnp.asarray(idx, jnp.int32)
    return {_adapters.SHARED: out}


def _resolved(m: _peft_tuner.ModuleWrite, x: Any) -> np.ndarray:
    if isinstance(x, _adapters.Shared):
        x = m.state.frozen.get(_adapters.SHARED, {}).get(x.name)
        if x is None:
            raise ValueError(f"save_peft: the state lacks the shared FRoD array of "
                             f"{m.path!r}")
    return np.asarray(jax.device_get(x))


SAVE_WARNING = (
    "FRoD files: when PEFT loads one it recomputes each module's U from a basis "
    "it regenerates with torch, then takes V from the file; a basis made by "
    "peftjax (adapters.init) can differ from torch's in the signs of its "
    "columns, and PEFT's outputs are then wrong (files whose basis was read "
    "from a PEFT file load correctly); compare a few outputs in PEFT")


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    warnings.warn(f"save_peft: {SAVE_WARNING}", UserWarning, stacklevel=2)
    hp = dict(m.adapter.hyperparameters)
    if "sparse_rate" not in hp or "group" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.frod adapter")
    t = m.trainable
    v, idx = _resolved(m, m.frozen.v), _resolved(m, m.frozen.indices)
    tensors = {"frod_lambda_l": np.asarray(jax.device_get(t.lambda_l)),
               "frod_lambda_s_values": np.asarray(jax.device_get(t.s_values))}
    return tensors, (category(m.module), hp["sparse_rate"], hp["regularization_alpha"],
                     hp["init_weights"], hp["dropout"], v, idx)


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    def one(i, field):
        vals = {v[i] for v in infos.values()}
        if len(vals) > 1:
            raise ValueError(f"save_peft: one PEFT FRoD adapter has one {field}; got "
                             f"{sorted(vals)}")
        return vals.pop()

    shared: dict[str, np.ndarray] = {}
    for module, (cat, *_, v, idx) in sorted(infos.items()):
        key = f"base_model.frod_V.{cat}"
        if key in shared and not (np.array_equal(shared[key], v) and np.array_equal(
                shared[f"base_model.frod_s_indices.{cat}"], idx.astype(np.int64))):
            raise ValueError(f"save_peft: the FRoD modules of PEFT category {cat!r} "
                             f"(e.g. {module!r}) do not share one basis and pattern; "
                             "give them one group")
        shared[key] = np.ascontiguousarray(v)
        shared[f"base_model.frod_s_indices.{cat}"] = np.ascontiguousarray(
            idx.astype(np.int64))
        shared[f"base_model.frod_s_size.{cat}"] = np.asarray([v.shape[0]] * 2, np.int64)
    return {"sparse_rate": one(1, "sparse_rate"),
            "regularization_alpha": one(2, "regularization_alpha"),
            "init_weights": one(3, "init_weights"), "frod_dropout": one(4, "dropout"),
            "save_projection": True, "projection_prng_key": 0, "progressbar": False,
            "fan_in_fan_out": False, "bias": "none",
            "runtime_offload_base_weight": False}, shared


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


TUNER = _peft_tuner.Tuner(
    peft_type="FROD",
    params_types=(_adapters.FRoDParams,),
    suffixes=("frod_lambda_l", "frod_lambda_s_values"),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"sparse_rate", "regularization_alpha", "init_weights",
                        "frod_dropout", "projection_prng_key", "progressbar",
                        "runtime_offload_base_weight", "layers_to_transform",
                        "layers_pattern"}),
    defaults={"fan_in_fan_out": False, "bias": "none", "save_projection": True},
    field_types={
        "sparse_rate": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "regularization_alpha": (_is_number, "a number"),
        "init_weights": (_is_bool, "true or false"),
        "frod_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "projection_prng_key": (lambda v: isinstance(v, int) and not isinstance(v, bool),
                                "an integer"),
        "progressbar": (_is_bool, "true or false"),
        "runtime_offload_base_weight": (_is_bool, "true or false"),
    },
    is_shared=lambda key: key.startswith(_PREFIXES),
    shared_frozen=_shared_frozen,
)
