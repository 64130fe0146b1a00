# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``C3A`` tensors and config, per module.

PEFT (``tuners/c3a``) saves one tensor per Linear module,
``base_model.model.<module>.c3a_kernel`` ``(out/b, in/b, b)``, float32,
which is ``peftjax.adapters.C3AParams.kernel`` as is (no transpose: the
kernel's axes are block indices, and ``adapters.c3a`` builds the update in
PEFT's orientation). Config: ``block_size`` with ``block_size_pattern`` (a key
``k`` matches a module name when ``re.match(rf".*\\.{k}$", name)``, the first
in file order, else the full name itself: PEFT's rule for this field) is
honoured and checked against the kernel's last axis; ``init_weights`` is inert
once trained; ``bias`` only at its default ``"none"``.

Exports: ``TUNER``, ``block_size``.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_config, _peft_tuner


def block_size(config: Mapping[str, Any], module: str) -> int:
    """PEFT's ``block_size`` of ``module`` (``block_size_pattern`` first)."""
    patterns = config.get("block_size_pattern") or {}
    for key, value in patterns.items():
        if re.match(rf".*\.{key}$", module):
            return int(value)
    return int(patterns.get(module, config.get("block_size", 256)))


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    """``(adapter, C3AParams, None)`` of one module."""
    k = m.tensors["c3a_kernel"]
    b = block_size(m.config, m.module)
    want = (m.dims.n_out // b, m.dims.n_in // b, b)
    if m.dims.n_in % b or m.dims.n_out % b:
        raise ValueError(f"load_peft: block_size={b} of {m.module!r} (block_size/"
                         f"block_size_pattern in {m.source}) does not divide in="
                         f"{m.dims.n_in} and out={m.dims.n_out}")
    if tuple(k.shape) != want:
        raise ValueError(f"load_peft: {m.module!r}.c3a_kernel has shape {k.shape}; "
                         f"expected (out/b, in/b, b) = {want} for block_size={b} "
                         f"(block_size/block_size_pattern in {m.source})")
    adapter = _adapters.c3a(b, dimension_numbers=m.dimension_numbers, param_dtype=m.dtype)
    return adapter, _adapters.C3AParams(jnp.asarray(k, m.dtype)), None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], int]:
    """The kernel (float32, as PEFT keeps it) and the block size."""
    hp = dict(m.adapter.hyperparameters)
    if "block_size" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.c3a adapter")
    k = np.asarray(jax.device_get(m.trainable.kernel), np.float32)
    return {"c3a_kernel": np.ascontiguousarray(k)}, int(hp["block_size"])


def _config(per_module: Mapping[str, int]) -> tuple[dict, dict]:
    """``block_size`` and a ``block_size_pattern`` of escaped full names."""
    common, others = _peft_config.most_common(dict(per_module))
    # ".*\.{key}$" meets a full name "model.layers.0.mlp.down_proj" through
    # its leading "model."; a name without a dot is found by the exact lookup
    pattern = {(re.escape(n.split(".", 1)[1]) if "." in n else n): b
               for n, b in others.items()}
    return {"block_size": common, "block_size_pattern": pattern, "bias": "none",
            "init_weights": "xavier_uniform"}, {}


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


TUNER = _peft_tuner.Tuner(
    peft_type="C3A",
    params_types=(_adapters.C3AParams,),
    suffixes=("c3a_kernel",),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"block_size", "block_size_pattern", "init_weights",
                        "layers_to_transform", "layers_pattern"}),
    defaults={"bias": "none"},
    field_types={
        "block_size": (_positive_int, "a positive int"),
        "block_size_pattern": (lambda v: isinstance(v, dict) and all(
            _positive_int(x) for x in v.values()), "an object of positive ints"),
    },
)
