# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``ROAD`` tensors and config, per module.

PEFT (``tuners/road``) stores, per Linear module, ``road_theta`` and
``road_alpha``, each ``(out/2,)``, ``(out,)`` or ``(2·out,)`` for the
variants ``road_1``, ``road_2`` and ``road_4``: the angles and scales of the
2-D rotations of the layer's output pairs (within groups of ``group_size``).
peftjax's ``RoAdParams(theta, alpha)`` are the same vectors (they index
output features, the same in both layouts). Config: ``variant``,
``group_size`` and ``init_weights`` are honoured (one of each per adapter);
a module whose tensors disagree with them is refused naming it. PEFT
rotates the layer's output, bias included; ``road`` rotates the sibling
bias the same way.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_SUFFIXES = ("road_theta", "road_alpha")
_SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    c = m.config
    variant, group = c.get("variant", "road_1"), int(c.get("group_size", 64))
    n_out = m.dims.n_out
    if n_out % group:
        raise ValueError(f"load_peft: {m.module!r} has {n_out} outputs, not a multiple "
                         f"of group_size={group} in {m.source}")
    want = (int(n_out * _SIZE[variant]),)
    for s in _SUFFIXES:
        if tuple(m.tensors[s].shape) != want:
            raise ValueError(f"load_peft: {m.module!r} has {s} "
                             f"{tuple(m.tensors[s].shape)}; {m.source} (variant="
                             f"{variant!r}) on out={n_out} gives {want}")
    adapter = _adapters.road(variant, group_size=group,
                             init_weights=bool(c.get("init_weights", True)),
                             param_dtype=m.dtype, dimension_numbers=m.dimension_numbers)
    t = _adapters.RoAdParams(jnp.asarray(m.tensors["road_theta"], m.dtype),
                             jnp.asarray(m.tensors["road_alpha"], m.dtype))
    return adapter, t, None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "variant" not in hp or "group_size" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.road adapter")
    host = lambda x: np.ascontiguousarray(np.asarray(jax.device_get(x)))  # noqa: E731
    return ({"road_theta": host(m.trainable.theta), "road_alpha": host(m.trainable.alpha)},
            (hp["variant"], hp["group_size"], hp["init_weights"]))


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    found = set(infos.values())
    if len(found) != 1:
        raise ValueError("save_peft: one PEFT RoAd adapter has one variant, group_size "
                         f"and init_weights; the modules have {sorted(found, key=repr)} "
                         "(variant, group_size, init_weights)")
    variant, group, init = found.pop()
    return {"variant": variant, "group_size": group, "init_weights": init}, {}


TUNER = _peft_tuner.Tuner(
    peft_type="ROAD",
    params_types=(_adapters.RoAdParams,),
    suffixes=_SUFFIXES,
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"variant", "group_size", "init_weights"}),
    field_types={
        "variant": (lambda v: v in _SIZE, "one of 'road_1', 'road_2', 'road_4'"),
        "group_size": (lambda v: isinstance(v, int) and not isinstance(v, bool)
                       and v > 0 and v % 2 == 0, "a positive even integer"),
        "init_weights": (lambda v: isinstance(v, bool), "true or false"),
    },
)
