# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``LOHA`` tensors and config, per module.

PEFT (``tuners/loha``) stores ``hada_w1_a`` ``(out, r)``, ``hada_w1_b``
``(r, in)``, ``hada_w2_a``, ``hada_w2_b`` per Linear module, with
``ΔW = (alpha/r)·(w1_a w1_b) ⊙ (w2_a w2_b)`` (torch ``(out, in)``); peftjax's
``LoHaParams`` hold the transposes, ``a_k = w{k}_b.T (in, r)`` and ``b_k =
w{k}_a.T (r, out)``. Config: ``r``, ``alpha`` with ``rank_pattern`` /
``alpha_pattern`` are honoured, ``init_weights`` is inert once trained;
rank/module dropout and ``use_effective_conv2d`` only at their defaults.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_config, _peft_tuner

_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    w = [m.tensors[k] for k in _SUFFIXES]
    r = int(w[0].shape[-1]) if w[0].ndim == 2 else -1
    if (any(x.ndim != 2 for x in w) or w[0].shape != w[2].shape
            or w[1].shape != w[3].shape or w[1].shape[0] != r):
        raise ValueError(f"load_peft: {m.module!r} has hada_w1_a/w1_b/w2_a/w2_b "
                         f"{[x.shape for x in w]}; expected (out, r), (r, in) twice "
                         "(use_effective_conv2d's hada_t1/t2 are not supported)")
    want_r = _peft_config.pattern_value(m.config.get("rank_pattern") or {}, m.module,
                                        m.config.get("r", 8))
    if r != want_r:
        raise ValueError(f"load_peft: {m.module!r} has rank {r} in the file but "
                         f"{want_r} in {m.source} (r/rank_pattern)")
    alpha = _peft_config.pattern_value(m.config.get("alpha_pattern") or {}, m.module,
                                       m.config.get("alpha", 8))
    t = _adapters.LoHaParams(*(jnp.asarray(x.T, m.dtype) for x in (w[1], w[0], w[3], w[2])))
    return (_adapters.loha(r, alpha=alpha, param_dtype=m.dtype,
                           dimension_numbers=m.dimension_numbers), t, None)


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "alpha" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.loha adapter")
    t = m.trainable
    tensors = {name: _peft_tuner.transposed(x) for name, x in
               zip(_SUFFIXES, (t.b1, t.a1, t.b2, t.a2), strict=True)}
    return tensors, (int(t.a1.shape[-1]), hp["alpha"])


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    r, rank_pattern = _peft_config.most_common({m: i[0] for m, i in infos.items()})
    alpha, alpha_pattern = _peft_config.most_common(
        {m: _number(i[1]) for m, i in infos.items()})
    return {"r": r, "alpha": alpha, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "rank_dropout": 0.0,
            "module_dropout": 0.0, "use_effective_conv2d": False,
            "init_weights": True}, {}


TUNER = _peft_tuner.Tuner(
    peft_type="LOHA",
    params_types=(_adapters.LoHaParams,),
    suffixes=_SUFFIXES,
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "alpha", "rank_pattern", "alpha_pattern",
                        "init_weights", "layers_to_transform", "layers_pattern"}),
    # peftjax's LoHa has no training-time rank/module dropout and no Tucker
    # cores (use_effective_conv2d only changes convolutions with a kernel > 1).
    defaults={"rank_dropout": 0.0, "module_dropout": 0.0,
              "use_effective_conv2d": False},
)
