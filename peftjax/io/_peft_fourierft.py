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

Exports: ``TUNER``, ``n_frequency``.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner


def n_frequency(config: Mapping[str, Any], module: str) -> int:
    """PEFT's ``n_frequency`` of ``module`` (``n_frequency_pattern`` first)."""
    for key, value in (config.get("n_frequency_pattern") or {}).items():
        if re.match(rf".*\.{key}$", module):
            return int(value)
    return int(config.get("n_frequency", 1000))


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    """``(adapter, FourierFTParams, FourierFTIndices)`` of one module."""
    spectrum = m.tensors["fourierft_spectrum"]
    if spectrum.ndim != 1:
        raise ValueError(f"load_peft: {m.module!r}.fourierft_spectrum has shape "
                         f"{spectrum.shape}; expected (n_frequency,)")
    n = n_frequency(m.config, m.module)
    if spectrum.shape[0] != n:
        raise ValueError(f"load_peft: {m.module!r} has {spectrum.shape[0]} spectral "
                         f"coefficients in the file but n_frequency={n} in {m.source} "
                         "(n_frequency/n_frequency_pattern)")
    seed = m.config.get("random_loc_seed", 777)
    if seed is None:
        raise ValueError(f"{m.source}: random_loc_seed=None (PEFT's positions need "
                         "a seed)")
    scaling = float(m.config.get("scaling", 150.0))
    adapter = _adapters.fourierft(n, scaling=scaling, random_loc_seed=int(seed),
                                  dimension_numbers=m.dimension_numbers,
                                  param_dtype=m.dtype)
    idx = _adapters.fourierft_indices(m.dims.n_out, m.dims.n_in, n, int(seed))
    return (adapter, _adapters.FourierFTParams(jnp.asarray(spectrum, m.dtype)),
            _adapters.FourierFTIndices(jnp.asarray(idx)))


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    """The spectrum, and ``(n_frequency, scaling, random_loc_seed)``.

    The hyperparameters come from the adapter (``fourierft`` records them),
    then are checked: the frozen positions must be PEFT's for that seed.
    """
    hp = dict(m.adapter.hyperparameters)
    if "random_loc_seed" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.fourierft adapter")
    n, scaling, seed = hp["n_frequency"], hp["scaling"], hp["random_loc_seed"]
    want = _adapters.fourierft_indices(m.dims.n_out, m.dims.n_in, n, seed)
    if not np.array_equal(np.asarray(jax.device_get(m.frozen.indices)), want):
        raise ValueError(f"save_peft: the frozen indices of {m.path!r} are not PEFT's "
                         f"positions for random_loc_seed={seed}; PEFT would "
                         "regenerate different ones")
    spectrum = np.ascontiguousarray(np.asarray(jax.device_get(m.trainable.spectrum)))
    return {"fourierft_spectrum": spectrum}, (n, scaling, seed)


def _config(per_module: Mapping[str, tuple[int, float, int]]) -> tuple[dict, dict]:
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
            "fan_in_fan_out": False, "bias": "none", "init_weights": False}, {}


TUNER = _peft_tuner.Tuner(
    peft_type="FOURIERFT",
    params_types=(_adapters.FourierFTParams,),
    suffixes=("fourierft_spectrum",),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"n_frequency", "n_frequency_pattern", "scaling",
                        "random_loc_seed", "init_weights", "layers_to_transform",
                        "layers_pattern"}),
    defaults={"fan_in_fan_out": False, "bias": "none"},
    field_types={
        "n_frequency": (lambda v: isinstance(v, int) and not isinstance(v, bool)
                        and v > 0, "a positive int"),
        "n_frequency_pattern": (lambda v: isinstance(v, dict) and all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0
            for x in v.values()), "an object of positive ints"),
        "random_loc_seed": (lambda v: isinstance(v, int) and not isinstance(v, bool),
                            "an int"),
    },
)
