# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``UNILORA`` tensors and config, per module.

PEFT (``tuners/unilora``) stores ONE trainable vector for the whole model,
``base_model.unilora_theta_d`` ``(d,)``, read into the shared trainable array
``AdapterState.trainable["@shared"]["unilora"]``. By default
(``save_indices=False``) a module has no tensors at all: PEFT regenerates
the index assignment from ``proj_seed`` over every adapted module in the
torch model's module order, which peftjax reproduces
(``adapters.unilora_indices`` over ``torch_order`` of the module names, Llama
and BERT names). With ``save_indices=True`` each module stores
``unilora_indices_A`` ``(r, in)``, ``unilora_indices_B`` ``(out, r)`` and the
matching ``unilora_scales_{A,B}``, which are read as stored (transposed to
Flax layout). ``save_peft`` always writes them (``save_indices=True``), so
peftjax's own index assignment (in path order) survives the round trip.
Config: ``r``, ``theta_d_length``, ``proj_seed``, ``save_indices``,
``init_theta_d_bound``/``init_weights`` (inert once trained) are honoured,
``unilora_dropout`` is the adapter's dropout; ``fan_in_fan_out`` and ``bias``
only at their defaults.

Exports: ``TUNER``.
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tinylora, _peft_tuner

THETA = "base_model.unilora_theta_d"
_SUFFIXES = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A",
             "unilora_scales_B")


@functools.lru_cache(maxsize=4)
def _assignment(sizes: tuple[tuple[int, int, int], ...], d: int, seed: int) -> tuple:
    return tuple(_adapters.unilora_indices(sizes, d, seed))


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    c = m.config
    r, d, seed = int(c.get("r", 4)), int(c.get("theta_d_length", 256)), int(
        c.get("proj_seed", 42))
    n_in, n_out = m.dims.n_in, m.dims.n_out
    if m.tensors:
        ia, ib, sa, sb = (np.asarray(m.tensors[k]) for k in _SUFFIXES)
        want = [(r, n_in), (n_out, r), (r, n_in), (n_out, r)]
        if [x.shape for x in (ia, ib, sa, sb)] != want:
            raise ValueError(
                f"load_peft: {m.module!r} has unilora_indices/scales "
                f"{[x.shape for x in (ia, ib, sa, sb)]}; r={r} in {m.source} and the "
                f"module (in={n_in}, out={n_out}) need {want}")
        if min(ia.min(), ib.min()) < 0 or max(ia.max(), ib.max()) >= d:
            raise ValueError(f"load_peft: {m.module!r} has unilora indices outside "
                             f"[0, theta_d_length={d})")
        ia, ib, sa, sb = ia.T, ib.T, sa.T, sb.T
    else:
        order = _peft_tinylora.torch_order(m.shapes)
        sizes = tuple((r, *m.shapes[x]) for x in order)
        ia, ib, sa, sb = _assignment(sizes, d, seed)[order.index(m.module)]
    theta = m.shared.get(THETA)
    if theta is None or tuple(theta.shape) != (d,):
        got = None if theta is None else tuple(theta.shape)
        raise ValueError(f"load_peft: {THETA} is {got}; theta_d_length={d} in "
                         f"{m.source} needs ({d},)")
    ad = _adapters.unilora(
        r, theta_d_length=d, proj_seed=seed,
        init_theta_d_bound=float(c.get("init_theta_d_bound", 0.02)),
        init_weights=bool(c.get("init_weights", True)),
        dropout=float(c.get("unilora_dropout", 0.0)),
        dimension_numbers=m.dimension_numbers, param_dtype=m.dtype)
    f = _adapters.UniLoRAIndices(jnp.asarray(ia, jnp.int32), jnp.asarray(ib, jnp.int32),
                                 jnp.asarray(sa, m.dtype), jnp.asarray(sb, m.dtype))
    return ad, _adapters.UniLoRAParams(_adapters.Shared("unilora")), f


def _shared_trainable(shared: Mapping[str, np.ndarray], config: Mapping[str, Any],
                      dtype: Any) -> dict[str, Any]:
    del config
    return {_adapters.SHARED: {"unilora": jnp.asarray(shared[THETA], dtype)}}


def _np(x: Any, dtype: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x)).T.astype(dtype))


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "theta_d_length" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.unilora adapter")
    theta = m.state.trainable.get(_adapters.SHARED, {}).get(hp["vector"])
    if theta is None:
        raise ValueError(f"save_peft: the state has no shared vector {hp['vector']!r} "
                         f"for {m.path!r} (trainable['@shared'])")
    f = m.frozen
    tensors = dict(zip(_SUFFIXES, (_np(f.indices_a, np.int64), _np(f.indices_b, np.int64),
                                   _np(f.scales_a, np.float32), _np(f.scales_b, np.float32)),
                       strict=True))
    info = (hp["rank"], hp["theta_d_length"], hp["proj_seed"], hp["init_theta_d_bound"],
            hp["init_weights"], m.adapter.dropout, hp["vector"])
    return tensors, (info, theta)


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    kinds = {i[0] for i in infos.values()}
    if len(kinds) != 1:
        raise ValueError("save_peft: PEFT's UNILORA has one r/theta_d_length/proj_seed/"
                         f"vector for all modules; got {sorted(map(str, kinds))}")
    (r, d, seed, bound, init, dropout, _), theta = next(iter(infos.values()))
    return ({"r": r, "theta_d_length": d, "proj_seed": seed, "init_theta_d_bound": bound,
             "init_weights": init, "unilora_dropout": dropout, "save_indices": True},
            {THETA: np.ascontiguousarray(np.asarray(jax.device_get(theta), np.float32))})


def _required(found: set[str]) -> set[str]:
    return set(_SUFFIXES) if found else set()


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


TUNER = _peft_tuner.Tuner(
    peft_type="UNILORA",
    params_types=(_adapters.UniLoRAParams,),
    suffixes=_SUFFIXES,
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "theta_d_length", "proj_seed", "save_indices",
                        "init_theta_d_bound", "init_weights", "unilora_dropout",
                        "layers_to_transform", "layers_pattern"}),
    defaults={"fan_in_fan_out": False, "bias": "none"},
    field_types={"r": (lambda v: _int(v) and v > 0, "a positive int"),
                 "theta_d_length": (lambda v: _int(v) and v > 0, "a positive int"),
                 "proj_seed": (_int, "an int")},
    required=_required,
    is_shared=lambda key: key == THETA,
    shared_trainable=_shared_trainable,
    modules_from_config=True,
)
