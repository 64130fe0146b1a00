# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``BEFT`` tensors and config, per module.

PEFT (``tuners/beft``) stores, per Linear module, ``beft_bias`` ``(1, out)``,
a trainable vector added to the layer's output (``y = x Wᵀ + b + β``; merged
into the bias by ``merge``). peftjax's ``BEFTParams.shift`` is
``beft_bias[0]`` on an ``adapters.beft`` adapter, which shifts the kernel's
sibling bias leaf: a module without a bias (the Llama projections) is refused
by ``adapters.validate`` with an error naming the path, since its shift has no
leaf in weight space. Config: ``init_weights`` is honoured (the adapter's
start; inert once loaded).

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    b = m.tensors["beft_bias"]
    if b.shape != (1, m.dims.n_out):
        raise ValueError(f"load_peft: {m.module!r} has beft_bias {b.shape}; expected "
                         f"(1, out={m.dims.n_out})")
    adapter = _adapters.beft(init_weights=bool(m.config.get("init_weights", True)),
                             param_dtype=m.dtype, dimension_numbers=m.dimension_numbers)
    return adapter, _adapters.BEFTParams(jnp.asarray(b[0], m.dtype)), None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], bool]:
    hp = dict(m.adapter.hyperparameters)
    if hp.get("bias_name") != "bias":
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} shifts the leaf "
                         f"{hp.get('bias_name')!r}; PEFT's BEFT shifts the module's bias")
    shift = np.asarray(jax.device_get(m.trainable.shift))
    return {"beft_bias": np.ascontiguousarray(shift[None, :])}, hp["init_weights"]


def _config(infos: Mapping[str, bool]) -> tuple[dict[str, Any], dict]:
    inits = set(infos.values())
    if len(inits) > 1:
        raise ValueError("save_peft: one PEFT BEFT adapter has one init_weights; got "
                         f"{sorted(inits)}")
    return {"init_weights": inits.pop()}, {}


TUNER = _peft_tuner.Tuner(
    peft_type="BEFT",
    params_types=(_adapters.BEFTParams,),
    suffixes=("beft_bias",),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"init_weights"}),
    field_types={"init_weights": (lambda v: isinstance(v, bool), "true or false")},
)
