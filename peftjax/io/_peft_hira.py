# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``HIRA`` tensors and config, per module.

PEFT (``tuners/hira``) stores ``hira_A`` ``(r, in)`` and ``hira_B`` ``(out,
r)`` per Linear module, with ``W' = W0 + W0 ⊙ (hira_B @ hira_A)`` (torch
``(out, in)``, no scale factor); peftjax's ``HiRAParams`` hold the
transposes, ``a = hira_A.T (in, r)`` and ``b = hira_B.T (r, out)``. Config:
``r`` is honoured (PEFT 0.21.2 builds every module with ``r``: its
``dispatch_default`` ignores ``rank_pattern``, so a file's rank is ``r``, or
the pattern's value for a PEFT that honours it; ``save_peft`` writes one rank
per file), ``init_weights`` is inert once
trained, ``hira_dropout`` > 0 gives the adapter ``factored_matmuls=True`` (the
only form that can drop the adapter input); ``fan_in_fan_out`` only at its
default (HiRA on an embedding, ``hira_embedding_A/B``, is not read).

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_config, _peft_tuner

_SUFFIXES = ("hira_A", "hira_B")


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    a_t, b_t = m.tensors["hira_A"], m.tensors["hira_B"]
    r = int(a_t.shape[0]) if a_t.ndim == 2 else -1
    if (a_t.ndim != 2 or b_t.ndim != 2 or b_t.shape[1] != r
            or a_t.shape[1] != m.dims.n_in or b_t.shape[0] != m.dims.n_out):
        raise ValueError(f"load_peft: {m.module!r} has hira_A {a_t.shape} and hira_B "
                         f"{b_t.shape}; expected (r, in={m.dims.n_in}) and "
                         f"(out={m.dims.n_out}, r)")
    # PEFT 0.21.2 builds every new HiRA module with ``r`` (its dispatch_default
    # does not read the rank_pattern value); a later PEFT may honour the pattern.
    r_config = m.config.get("r", 32)
    r_pattern = _peft_config.pattern_value(m.config.get("rank_pattern") or {}, m.module,
                                           r_config)
    if r not in (r_config, r_pattern):
        raise ValueError(f"load_peft: {m.module!r} has rank {r} in the file but "
                         f"r={r_config} (rank_pattern: {r_pattern}) in {m.source}")
    dropout = float(m.config.get("hira_dropout") or 0.0)
    adapter = _adapters.hira(r, factored_matmuls=dropout > 0, dropout=dropout,
                             param_dtype=m.dtype, dimension_numbers=m.dimension_numbers)
    t = _adapters.HiRAParams(jnp.asarray(a_t.T, m.dtype), jnp.asarray(b_t.T, m.dtype))
    return adapter, t, None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "factored_matmuls" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.hira adapter")
    t = m.trainable
    tensors = {"hira_A": _peft_tuner.transposed(t.a), "hira_B": _peft_tuner.transposed(t.b)}
    return tensors, (int(t.a.shape[-1]), hp["dropout"])


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    dropouts = {i[1] for i in infos.values()}
    if len(dropouts) > 1:
        raise ValueError("save_peft: one PEFT HiRA adapter has one hira_dropout; got "
                         f"{sorted(dropouts)}")
    r, others = _peft_config.most_common({m: i[0] for m, i in infos.items()})
    if others:
        raise ValueError(
            f"save_peft: HiRA modules of rank {r} and {sorted(set(others.values()))} "
            f"({sorted(others)[:4]}); PEFT 0.21.2 builds every HiRA module with the "
            "config's r (it ignores rank_pattern), so one file holds one rank")
    return {"r": r, "rank_pattern": {}, "hira_dropout": dropouts.pop(),
            "fan_in_fan_out": False, "init_weights": True}, {}


TUNER = _peft_tuner.Tuner(
    peft_type="HIRA",
    params_types=(_adapters.HiRAParams,),
    suffixes=_SUFFIXES,
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "rank_pattern", "hira_dropout", "init_weights",
                        "layers_to_transform", "layers_pattern"}),
    defaults={"fan_in_fan_out": False},
    field_types={"hira_dropout": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
        "a number in [0, 1)")},
)
