# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``LOKR`` tensors and config, per module.

PEFT (``tuners/lokr``) stores ``ΔW = (alpha/r)·kron(W1, W2)`` (torch
``(out, in)``) per Linear module: each Kronecker factor full (``lokr_w1``
``(out_l, in_m)``, ``lokr_w2`` ``(out_k, in_n)``) or as a rank-``r`` product
(``lokr_w1_a`` ``(out_l, r)`` @ ``lokr_w1_b`` ``(r, in_m)``, likewise
``w2``). ``decompose_both`` and ``decompose_factor`` decide which factors are
full and how each side splits; peftjax's ``LoKrParams`` hold every tensor
transposed under its own name. Config: ``r``, ``alpha`` with
``rank_pattern``/``alpha_pattern``, ``decompose_both``, ``decompose_factor``
are honoured, ``init_weights`` is inert once trained; rank/module dropout,
``rank_dropout_scale`` and ``use_effective_conv2d`` only at their defaults.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_config, _peft_tuner

_FACTORS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")


def _required(found: set[str]) -> set[str]:
    """Each factor full (``lokr_wk``) or as ``lokr_wk_a``, ``lokr_wk_b``."""
    return {n for k in ("w1", "w2") for n in (
        [f"lokr_{k}"] if f"lokr_{k}" in found else [f"lokr_{k}_a", f"lokr_{k}_b"])}


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    got = m.tensors
    if any(x.ndim != 2 for x in got.values()):
        raise ValueError(f"load_peft: {m.module!r} has LoKr tensors "
                         f"{ {k: x.shape for k, x in got.items()} }; only Linear "
                         "(2-D factors) is supported")
    r = _peft_config.pattern_value(m.config.get("rank_pattern") or {}, m.module,
                                   m.config.get("r", 8))
    for k in ("w1", "w2"):
        if f"lokr_{k}_a" in got and got[f"lokr_{k}_a"].shape[1] != r:
            raise ValueError(f"load_peft: {m.module!r} has lokr_{k}_a "
                             f"{got[f'lokr_{k}_a'].shape} but rank {r} in {m.source} "
                             "(r/rank_pattern)")
    alpha = _peft_config.pattern_value(m.config.get("alpha_pattern") or {}, m.module,
                                       m.config.get("alpha", 8))
    t = _adapters.LoKrParams(**{k[len("lokr_"):]: jnp.asarray(x.T, m.dtype)
                                for k, x in got.items()})
    adapter = _adapters.lokr(
        r, alpha=alpha, decompose_both=bool(m.config.get("decompose_both", False)),
        decompose_factor=int(m.config.get("decompose_factor", -1)), param_dtype=m.dtype,
        dimension_numbers=m.dimension_numbers)
    return adapter, t, None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    """Every factor tensor transposed; ``(rank, alpha, shape, w1 decomposed)``.

    ``shape`` is ``(in_m, out_l, in_n, out_k)``. With both factors full, any
    rank at least every half-side keeps them full in PEFT; ``alpha = s·r``
    keeps the scaling ``s``.
    """
    hp = dict(m.adapter.hyperparameters)
    if "decompose_factor" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.lokr adapter")
    t = m.trainable
    tensors = {f"lokr_{n}": _peft_tuner.transposed(x)
               for n, x in t._asdict().items() if x is not None}
    in_m, out_l = ((t.w1.shape[0], t.w1.shape[1]) if t.w1 is not None
                   else (t.w1_b.shape[0], t.w1_a.shape[1]))
    in_n, out_k = ((t.w2.shape[0], t.w2.shape[1]) if t.w2 is not None
                   else (t.w2_b.shape[0], t.w2_a.shape[1]))
    shape = (in_m, out_l, in_n, out_k)
    ranks = {int(x.shape[0]) for x in (t.w1_a, t.w2_a) if x is not None}
    r = ranks.pop() if ranks else max(shape)
    s = float(np.float32(hp["alpha"] / hp["rank"]))
    return tensors, (r, _peft_config.alpha_for(s, r, False), shape, t.w1 is None)


def _decomposition(layers: Mapping[str, tuple]) -> dict[str, Any]:
    """``decompose_both`` / ``decompose_factor`` that make PEFT build every module's
    structure; raises when no single PEFT config does."""
    both = any(dec1 for _, _, _, dec1 in layers.values())
    for module, (r, _, shape, dec1) in layers.items():
        in_m, out_l = shape[0], shape[1]
        if both and not dec1 and r < max(out_l, in_m) / 2:
            raise ValueError(
                f"save_peft: LoKr on {module!r} has a full w1 {(in_m, out_l)} at rank "
                f"{r}, while other modules decompose w1: no single PEFT "
                "decompose_both builds both")
    candidates = [-1] + sorted({v for _, _, s, _ in layers.values() for v in s})
    for f in candidates:
        if all(_adapters.lokr_factorization(s[0] * s[2], f) == (s[0], s[2]) and
               _adapters.lokr_factorization(s[1] * s[3], f) == (s[1], s[3])
               for _, _, s, _ in layers.values()):
            return {"decompose_both": both, "decompose_factor": f}
    raise ValueError(
        "save_peft: no single PEFT decompose_factor splits every LoKr module as its "
        "factors do: " + ", ".join(f"{m}: in {s[0]}x{s[2]}, out {s[1]}x{s[3]}"
                                   for m, (_, _, s, _) in sorted(layers.items())))


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    r, rank_pattern = _peft_config.most_common({m: i[0] for m, i in infos.items()})
    alpha, alpha_pattern = _peft_config.most_common({m: i[1] for m, i in infos.items()})
    return {"r": r, "alpha": alpha, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "rank_dropout": 0.0,
            "module_dropout": 0.0, "rank_dropout_scale": False,
            "use_effective_conv2d": False, "init_weights": True,
            **_decomposition(infos)}, {}


TUNER = _peft_tuner.Tuner(
    peft_type="LOKR",
    params_types=(_adapters.LoKrParams,),
    suffixes=tuple(f"lokr_{n}" for n in _FACTORS),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "alpha", "rank_pattern", "alpha_pattern",
                        "decompose_both", "decompose_factor", "init_weights",
                        "layers_to_transform", "layers_pattern"}),
    # peftjax's LoKr has no training-time rank/module dropout and no Tucker
    # cores (use_effective_conv2d only changes convolutions).
    defaults={"rank_dropout": 0.0, "module_dropout": 0.0,
              "rank_dropout_scale": False, "use_effective_conv2d": False},
    field_types={
        "decompose_both": (lambda v: isinstance(v, bool), "true or false"),
        "decompose_factor": (lambda v: isinstance(v, int) and not isinstance(v, bool)
                             and (v == -1 or v > 0), "-1 or a positive int"),
    },
    required=_required,
)
