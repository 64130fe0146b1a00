# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``DELORA`` tensors and config, per module.

PEFT (``tuners/delora``) stores, per Linear module, ``delora_A`` ``(r, in)``,
``delora_B`` ``(out, r)``, the trainable boundary ``delora_lambda`` ``(1,)``
and the frozen per-input norms of the base ``delora_w_norm`` ``(in,)`` (a
persistent buffer computed from the base at init), with ``ΔW = B ·
diag(λ/r/(‖A_i‖‖B_i‖)) · A · diag(w_norm)`` (torch ``(out, in)``). peftjax's
``DeLoRAParams`` hold ``a = delora_A.T``, ``b = delora_B.T``, ``boundary =
delora_lambda``, and ``DeLoRANorm.w_norm`` is the file's buffer (not
recomputed: PEFT uses the saved one). Config: ``r`` with ``rank_pattern``,
``delora_lambda`` with ``lambda_pattern`` (the initial ``λ``, inert once
trained but kept on the adapter), ``module_dropout`` (the adapter-input
dropout of the factored path) and ``init_weights`` are honoured; ``bias`` only
at its default.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_config, _peft_tuner

_SUFFIXES = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    a_t, b_t = m.tensors["delora_A"], m.tensors["delora_B"]
    lam, w_norm = m.tensors["delora_lambda"], m.tensors["delora_w_norm"]
    r = int(a_t.shape[0]) if a_t.ndim == 2 else -1
    if (a_t.ndim != 2 or b_t.ndim != 2 or b_t.shape[1] != r
            or a_t.shape[1] != m.dims.n_in or b_t.shape[0] != m.dims.n_out
            or lam.shape != (1,) or w_norm.shape != (m.dims.n_in,)):
        raise ValueError(f"load_peft: {m.module!r} has delora_A {a_t.shape}, delora_B "
                         f"{b_t.shape}, delora_lambda {lam.shape}, delora_w_norm "
                         f"{w_norm.shape}; expected (r, in={m.dims.n_in}), "
                         f"(out={m.dims.n_out}, r), (1,), (in={m.dims.n_in},)")
    want_r = _peft_config.pattern_value(m.config.get("rank_pattern") or {}, m.module,
                                        m.config.get("r", 8))
    if r != want_r:
        raise ValueError(f"load_peft: {m.module!r} has rank {r} in the file but "
                         f"{want_r} in {m.source} (r/rank_pattern)")
    lam0 = _peft_config.pattern_value(m.config.get("lambda_pattern") or {}, m.module,
                                      m.config.get("delora_lambda", 15))
    adapter = _adapters.delora(
        r, delora_lambda=float(lam0), init_weights=bool(m.config.get("init_weights", True)),
        dropout=float(m.config.get("module_dropout") or 0.0), param_dtype=m.dtype,
        dimension_numbers=m.dimension_numbers)
    t = _adapters.DeLoRAParams(jnp.asarray(a_t.T, m.dtype), jnp.asarray(b_t.T, m.dtype),
                               jnp.asarray(lam, m.dtype))
    return adapter, t, _adapters.DeLoRANorm(jnp.asarray(w_norm, m.dtype))


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "delora_lambda" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.delora adapter")
    t = m.trainable
    tensors = {
        "delora_A": _peft_tuner.transposed(t.a),
        "delora_B": _peft_tuner.transposed(t.b),
        "delora_lambda": np.ascontiguousarray(np.asarray(jax.device_get(t.boundary))),
        "delora_w_norm": np.ascontiguousarray(np.asarray(jax.device_get(m.frozen.w_norm))),
    }
    return tensors, (int(t.a.shape[-1]), hp["delora_lambda"], hp["dropout"],
                     hp["init_weights"])


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    dropouts = {i[2] for i in infos.values()}
    inits = {i[3] for i in infos.values()}
    if len(dropouts) > 1 or len(inits) > 1:
        raise ValueError("save_peft: one PEFT DeLoRA adapter has one module_dropout "
                         f"and one init_weights; got {sorted(dropouts)} and "
                         f"{sorted(inits)}")
    r, rank_pattern = _peft_config.most_common({m: i[0] for m, i in infos.items()})
    lam, lambda_pattern = _peft_config.most_common(
        {m: _number(i[1]) for m, i in infos.items()})
    return {"r": r, "rank_pattern": rank_pattern, "delora_lambda": lam,
            "lambda_pattern": lambda_pattern, "module_dropout": dropouts.pop(),
            "init_weights": inits.pop(), "bias": "none"}, {}


TUNER = _peft_tuner.Tuner(
    peft_type="DELORA",
    params_types=(_adapters.DeLoRAParams,),
    suffixes=_SUFFIXES,
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "rank_pattern", "delora_lambda", "lambda_pattern",
                        "module_dropout", "init_weights", "layers_to_transform",
                        "layers_pattern"}),
    defaults={"bias": "none"},
    field_types={
        "delora_lambda": (lambda v: isinstance(v, (int, float))
                          and not isinstance(v, bool), "a number"),
        "lambda_pattern": (lambda v: isinstance(v, dict) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()),
            "an object of numbers"),
        "module_dropout": (lambda v: isinstance(v, (int, float))
                           and not isinstance(v, bool) and 0 <= v < 1,
                           "a number in [0, 1)"),
        "init_weights": (lambda v: isinstance(v, bool), "true or false"),
    },
)
