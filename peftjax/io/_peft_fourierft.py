# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``FOURIERFT`` tensors and config, per module.

PEFT (``tuners/fourierft``) saves one tensor per module,
``base_model.model.<module>.fourierft_spectrum`` ``(n,)``; the frequency
positions are not saved: PEFT regenerates them from ``random_loc_seed`` and
the module's shape (``peftjax.adapters.fourierft_indices`` reproduces them).
Config: ``n_frequency`` with ``n_frequency_pattern`` (a key ``k`` matches a
module name when ``re.match(rf".*\\.{k}$", name)``, the first in file order,
PEFT's rule for this field), ``scaling``, ``random_loc_seed`` and
``init_weights`` (inert once trained) are honoured; ``fan_in_fan_out`` and
``bias`` only at their defaults (``check_config``).

Used by ``load_peft`` and ``save_peft`` (the public entry points).
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax import tree

SUFFIX = ".fourierft_spectrum"
_NAME = re.compile(r"fourierft\(n_frequency=(\d+), scaling=(.+), seed=(-?\d+)\)")


def n_frequency(config: Mapping[str, Any], module: str) -> int:
    """PEFT's ``n_frequency`` of ``module`` (``n_frequency_pattern`` first)."""
    for key, value in (config.get("n_frequency_pattern") or {}).items():
        if re.match(rf".*\.{key}$", module):
            return int(value)
    return int(config.get("n_frequency", 1000))


def build(config: Mapping[str, Any], module: str, spectrum: np.ndarray, dtype: Any,
          source: str, dims: tree.ResolvedDims,
          dn: tree.DimensionNumbers | None) -> tuple:
    """``(adapter, FourierFTParams, FourierFTIndices)`` of one module."""
    if spectrum.ndim != 1:
        raise ValueError(f"load_peft: {module!r}.fourierft_spectrum has shape "
                         f"{spectrum.shape}; expected (n_frequency,)")
    n = n_frequency(config, module)
    if spectrum.shape[0] != n:
        raise ValueError(f"load_peft: {module!r} has {spectrum.shape[0]} spectral "
                         f"coefficients in the file but n_frequency={n} in {source} "
                         "(n_frequency/n_frequency_pattern)")
    seed = config.get("random_loc_seed", 777)
    if seed is None:
        raise ValueError(f"{source}: random_loc_seed=None (PEFT's positions need "
                         "a seed)")
    scaling = float(config.get("scaling", 150.0))
    adapter = _adapters.fourierft(n, scaling=scaling, random_loc_seed=int(seed),
                                  dimension_numbers=dn, param_dtype=dtype)
    idx = _adapters.fourierft_indices(dims.n_out, dims.n_in, n, int(seed))
    return (adapter, _adapters.FourierFTParams(jnp.asarray(spectrum, dtype)),
            _adapters.FourierFTIndices(jnp.asarray(idx)))


def hyperparameters(adapter: _adapters.Adapter, f: Any, dims: tree.ResolvedDims,
                    path: str) -> tuple[int, float, int]:
    """``(n_frequency, scaling, random_loc_seed)`` of one (unrolled) matrix.

    Read off the adapter's description (``fourierft`` writes every
    hyperparameter into it), then checked: the frozen positions must be
    PEFT's for that seed.
    """
    m = _NAME.fullmatch(repr(adapter))
    if m is None:
        raise ValueError(f"save_peft: {adapter!r} on {path!r} is not a "
                         "peftjax.adapters.fourierft adapter")
    n, scaling, seed = int(m.group(1)), float(m.group(2)), int(m.group(3))
    want = _adapters.fourierft_indices(dims.n_out, dims.n_in, n, seed)
    if not np.array_equal(np.asarray(jax.device_get(f.indices)), want):
        raise ValueError(f"save_peft: the frozen indices of {path!r} are not PEFT's "
                         f"positions for random_loc_seed={seed}; PEFT would "
                         "regenerate different ones")
    return n, scaling, seed


def config_fields(per_module: Mapping[str, tuple[int, float, int]]) -> dict[str, Any]:
    """``n_frequency`` (+ pattern of full names), ``scaling``, ``random_loc_seed``."""
    scalings = {s for _, s, _ in per_module.values()}
    seeds = {s for _, _, s in per_module.values()}
    if len(scalings) > 1 or len(seeds) > 1:
        raise ValueError("save_peft: one PEFT FourierFT adapter has one scaling and "
                         f"one random_loc_seed; got scalings {sorted(scalings)} and "
                         f"seeds {sorted(seeds)}")
    counts: dict[int, int] = {}
    for n, _, _ in per_module.values():
        counts[n] = counts.get(n, 0) + 1
    common = max(sorted(counts), key=lambda n: counts[n])
    # full names, escaped: PEFT matches ".*\.{key}$", which a full name
    # "model.layers.0.mlp.down_proj" meets through its leading "model."
    pattern = {re.escape(m.split(".", 1)[1]) if "." in m else re.escape(m): n
               for m, (n, _, _) in sorted(per_module.items()) if n != common}
    return {"n_frequency": common, "n_frequency_pattern": pattern,
            "scaling": scalings.pop(), "random_loc_seed": seeds.pop(),
            "fan_in_fan_out": False, "bias": "none", "init_weights": False}
