# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``OFT`` tensors and config, per module.

PEFT (``tuners/oft``) stores, per Linear module, ``oft_R.weight`` ``(n,
b(b−1)/2)`` (``(1, ...)`` with ``block_share``): per block the strictly
upper-triangular entries of the skew-symmetric ``Q`` in ``triu_indices``
order, rotating the input ``x ↦ x·R`` before the base layer. peftjax's
``OFTParams.q`` is the tensor as stored (no transpose: it is per block, not
per feature). Config: ``oft_block_size`` or ``r`` (PEFT moves one that does
not divide a module's ``in`` to the nearest divisor; ``oft`` does the same,
and a file whose shape disagrees is refused naming the module), ``coft``,
``eps``, ``block_share``, ``use_cayley_neumann``,
``num_cayley_neumann_terms`` and ``init_weights`` are honoured;
``module_dropout`` (PEFT's multiplicative block dropout) and ``bias`` only at
their defaults. A COFT adapter is written with each block projected, as
PEFT's parameter is after a forward.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_SUFFIX = "oft_R.weight"
_FIELDS = ("block_size", "r", "coft", "eps", "block_share", "use_cayley_neumann",
           "num_cayley_neumann_terms", "init_weights")


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    q = m.tensors[_SUFFIX]
    c = m.config
    block_size, r = int(c.get("oft_block_size") or 0), int(c.get("r") or 0)
    if (block_size != 0) == (r != 0):
        raise ValueError(f"load_peft: {m.source} must set exactly one of r ({r}) and "
                         f"oft_block_size ({block_size}) (PEFT's rule)")
    n_in = m.dims.n_in
    b = _adapters.oft_block_size(n_in, block_size=block_size, r=r)
    share = bool(c.get("block_share", False))
    want = (1 if share else n_in // b, b * (b - 1) // 2)
    if tuple(q.shape) != want:
        raise ValueError(f"load_peft: {m.module!r} has oft_R.weight {tuple(q.shape)}; "
                         f"{m.source} (oft_block_size={block_size}, r={r}, block_share="
                         f"{share}) gives blocks of {b} on in={n_in}: expected {want}")
    adapter = _adapters.oft(
        block_size or None, r=r or None, coft=bool(c.get("coft", False)),
        eps=float(c.get("eps", 6e-5)), block_share=share,
        use_cayley_neumann=bool(c.get("use_cayley_neumann", True)),
        num_cayley_neumann_terms=int(c.get("num_cayley_neumann_terms", 5)),
        init_weights=bool(c.get("init_weights", True)), param_dtype=m.dtype,
        dimension_numbers=m.dimension_numbers)
    return adapter, _adapters.OFTParams(jnp.asarray(q, m.dtype)), None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "num_cayley_neumann_terms" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.oft adapter")
    q = m.trainable.q
    if hp["coft"]:
        q = _adapters.oft_project(q, hp["eps"]).astype(q.dtype)
    tensors = {_SUFFIX: np.ascontiguousarray(np.asarray(jax.device_get(q)))}
    return tensors, tuple(hp[k] for k in _FIELDS)


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    found = set(infos.values())
    if len(found) != 1:
        raise ValueError("save_peft: one PEFT OFT adapter has one oft_block_size/r, "
                         "coft, eps, block_share and Cayley setting; the modules have "
                         f"{sorted(found, key=repr)} ({', '.join(_FIELDS)})")
    v = dict(zip(_FIELDS, found.pop(), strict=True))
    return {"oft_block_size": v["block_size"], "r": v["r"], "coft": v["coft"],
            "eps": v["eps"], "block_share": v["block_share"],
            "use_cayley_neumann": v["use_cayley_neumann"],
            "num_cayley_neumann_terms": v["num_cayley_neumann_terms"],
            "init_weights": v["init_weights"], "module_dropout": 0.0,
            "bias": "none"}, {}


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


TUNER = _peft_tuner.Tuner(
    peft_type="OFT",
    params_types=(_adapters.OFTParams,),
    suffixes=(_SUFFIX,),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "oft_block_size", "coft", "eps", "block_share",
                        "use_cayley_neumann", "num_cayley_neumann_terms",
                        "init_weights", "layers_to_transform", "layers_pattern"}),
    defaults={"bias": "none", "module_dropout": 0.0},
    field_types={
        "r": (_int, "a non-negative integer"),
        "oft_block_size": (_int, "a non-negative integer"),
        "num_cayley_neumann_terms": (lambda v: _int(v) and v >= 1, "a positive integer"),
        "coft": (_flag, "true or false"),
        "block_share": (_flag, "true or false"),
        "use_cayley_neumann": (_flag, "true or false"),
        "init_weights": (_flag, "true or false"),
        "eps": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                and v > 0, "a positive number"),
    },
)
