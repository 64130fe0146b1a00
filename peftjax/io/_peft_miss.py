# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``MISS`` tensors and config, per module.

PEFT (``tuners/miss``) stores one tensor per Linear module, ``miss_block``:
``(r, out)`` for ``init_weights=True`` (balance) or ``False`` (balance with
a random start), ``(r, mini_r)`` for ``"mini"``, ``(out/r, r, r)`` for
``"bat"``; peftjax's ``MiSSParams.block`` holds it as stored. Config: ``r``,
``init_weights`` (which selects the ``MiSSVariant``), ``mini_r`` and
``miss_dropout`` are honoured (one value for every module: PEFT has no
patterns for this type); ``bias`` only at its default. ``miss_dropout``
with ``"bat"`` is refused: PEFT's bat forward has no input term to drop.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_V = _adapters.MiSSVariant
_INIT = {_V.BALANCE: True, _V.MINI: "mini", _V.BAT: "bat"}


def _variant(init_weights: Any) -> _adapters.MiSSVariant:
    return {"mini": _V.MINI, "bat": _V.BAT}.get(init_weights, _V.BALANCE)


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    c = m.config
    r, mini_r = int(c.get("r", 64)), int(c.get("mini_r", 1) or 1)
    variant = _variant(c.get("init_weights", True))
    block = m.tensors["miss_block"]
    n_in, n_out = m.dims.n_in, m.dims.n_out
    want = {_V.BALANCE: (r, n_out), _V.MINI: (r, mini_r),
            _V.BAT: (n_out // r, r, r)}[variant]
    if tuple(block.shape) != want:
        raise ValueError(
            f"load_peft: {m.module!r}.miss_block has shape {block.shape}; r={r}, "
            f"init_weights={c.get('init_weights', True)!r}, mini_r={mini_r} in "
            f"{m.source} and the module (in={n_in}, out={n_out}) give {want}")
    adapter = _adapters.miss(
        r, variant=variant, mini_r=mini_r,
        dropout=float(c.get("miss_dropout", 0.0) or 0.0),
        dimension_numbers=m.dimension_numbers, param_dtype=m.dtype)
    return adapter, _adapters.MiSSParams(jnp.asarray(block, m.dtype)), None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "variant" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.miss adapter")
    block = np.ascontiguousarray(np.asarray(jax.device_get(m.trainable.block)))
    mini_r = hp["mini_r"] if hp["variant"] is _V.MINI else 1
    return {"miss_block": block}, (hp["rank"], hp["variant"].value, mini_r,
                                   hp["dropout"])


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    distinct = sorted(set(infos.values()))
    if len(distinct) > 1:
        raise ValueError(
            "save_peft: one PEFT MiSS adapter has one (r, variant, mini_r, "
            f"miss_dropout) for every module (no patterns); got {distinct}")
    r, variant, mini_r, dropout = distinct[0]
    return {"r": r, "init_weights": _INIT[_V(variant)], "mini_r": mini_r,
            "miss_dropout": dropout, "bias": "none"}, {}


def _check(config: Mapping[str, Any], source: str) -> list[str]:
    if config.get("init_weights") == "bat" and config.get("miss_dropout"):
        return [f"miss_dropout={config['miss_dropout']!r} with init_weights='bat' "
                "(PEFT's bat forward ignores it; peftjax refuses it)"]
    return []


TUNER = _peft_tuner.Tuner(
    peft_type="MISS",
    params_types=(_adapters.MiSSParams,),
    suffixes=("miss_block",),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "init_weights", "mini_r", "miss_dropout",
                        "layers_to_transform", "layers_pattern"}),
    defaults={"bias": "none"},
    field_types={
        "init_weights": (lambda v: isinstance(v, bool) or v in ("bat", "mini"),
                         'true, false, "bat" or "mini"'),
        "mini_r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                   "a positive int"),
        "miss_dropout": (lambda v: isinstance(v, (int, float))
                         and not isinstance(v, bool) and 0 <= v < 1,
                         "a number in [0, 1)"),
    },
    check=_check,
)
