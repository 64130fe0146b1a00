# SPDX-License-Identifier: Apache-2.0
"""LoRA libraries for Arrow: PEFT LoRA directories read as per-site stacks.

PEFT's Arrow (``create_arrow_model``) has no file of its own: it loads task
(and general) LoRA directories and routes over them. ``load_arrow`` does
the same for ``adapters.ArrowHook``.

Exports: ``load_arrow``.
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_poly, _peft_xlora


def _lora(path, sites, n_layers, dtype):
    import pathlib

    got = _peft_xlora._expert(pathlib.Path(path), sites, n_layers)
    a, b, s = {}, {}, {}
    for site in sorted({t for t, _ in got}):
        if {i for t, i in got if t == site} != set(range(n_layers)):
            raise ValueError(f"load_arrow: {path}: {site} is not adapted in every layer")
        a[site] = jnp.asarray(np.stack([got[(site, i)][0] for i in range(n_layers)]), dtype)
        b[site] = jnp.asarray(np.stack([got[(site, i)][1] for i in range(n_layers)]), dtype)
        s[site] = got[(site, 0)][2]
    return a, b, s


def load_arrow(task_paths: Sequence[str | os.PathLike], key_map: Mapping[str, Any],
               config: _adapters.ArrowConfig | None = None, *,
               general_paths: Sequence[str | os.PathLike] = (),
               dtype: Any = jnp.float32) -> _adapters.ArrowExperts:
    """Reads PEFT LoRA directories into ``ArrowExperts`` (PEFT's ``create_arrow_model``).

    Args:
      task_paths: the task LoRAs (PEFT's ``task_specific_adapter_paths``).
      key_map: the model's (``llama.peft_key_map(cfg)``).
      config: ``adapters.ArrowConfig`` (default ``ArrowConfig()``).
      general_paths: GenKnowSub's general LoRAs (``general_adapter_paths``).
      dtype: of the arrays.

    Returns:
      ``ArrowExperts`` for ``adapters.ArrowHook``.

    Example:
      >>> import tempfile, jax
      >>> from peftjax import adapters, io
      >>> from peftjax.models import llama
      >>> from peftjax.models.llama import _tiny
      >>> mc = _tiny.tiny_config(num_hidden_layers=1)
      >>> d, km = mc.hidden_size, llama.peft_key_map(mc)
      >>> cfg = adapters.XLoraConfig(n_experts=2, sites=("self_attn/q_proj",),
      ...                            n_layers=1, hidden_size=d)
      >>> ex = adapters.XLoraExperts(  # written as two plain LoRA directories
      ...     {"self_attn/q_proj": jax.random.normal(jax.random.key(0), (1, 2, d, 2))},
      ...     {"self_attn/q_proj": jax.random.normal(jax.random.key(1), (1, 2, 2, d))},
      ...     {"self_attn/q_proj": jnp.ones((2,))})
      >>> out = io.save_peft_xlora(tempfile.mkdtemp(), adapters.xlora_init(
      ...     jax.random.key(0), cfg), ex, cfg, km)
      >>> arrow = load_arrow([out / "0", out / "1"], km, adapters.ArrowConfig(top_k=1))
      >>> arrow.prototypes["self_attn/q_proj"].shape == (1, 2, d)
      True
    """
    config = _adapters.ArrowConfig() if config is None else config
    sites = _peft_poly.sites_of(key_map)
    n_layers = 1 + max(i for _, i in sites)
    task = [_lora(p, sites, n_layers, dtype) for p in task_paths]
    general = [_lora(p, sites, n_layers, dtype) for p in general_paths]
    return _adapters.arrow_experts(task, general if config.use_gks else (), config)
