# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``WAVEFT`` tensors and config, per module.

PEFT (``tuners/waveft``) saves one tensor per Linear module,
``base_model.model.<module>.waveft_spectrum`` ``(n,)``; the coefficient
positions are not saved: PEFT regenerates them from ``random_loc_seed`` and
the module's shape exactly as FourierFT does (``peftjax.adapters.
fourierft_indices`` reproduces them). Config: ``n_frequency`` with
``n_frequency_pattern`` (PEFT's ``get_pattern_key`` rule), ``scaling``,
``wavelet_family``, ``use_idwt`` and ``random_loc_seed`` are honoured;
``proportional_parameters=True`` (PEFT then shares ``n_frequency`` times the
number of modules among them in proportion to ``in·out``) is honoured by
taking each module's ``n`` from its tensor, which is the only input the
positions need; ``init_weights`` is inert once trained; ``fan_in_fan_out``
and ``bias`` only at their defaults.

Exports: ``TUNER``, ``n_frequency``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_config, _peft_tuner


def n_frequency(config: Mapping[str, Any], module: str) -> int:
    """PEFT's ``n_frequency`` of ``module`` (``n_frequency_pattern`` first)."""
    return int(_peft_config.pattern_value(config.get("n_frequency_pattern") or {},
                                          module, config.get("n_frequency", 2592)))


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    """``(adapter, WaveFTParams, WaveFTIndices)`` of one module."""
    spectrum = m.tensors["waveft_spectrum"]
    if spectrum.ndim != 1:
        raise ValueError(f"load_peft: {m.module!r}.waveft_spectrum has shape "
                         f"{spectrum.shape}; expected (n_frequency,)")
    if m.config.get("proportional_parameters"):
        n = int(spectrum.shape[0])
    else:
        n = n_frequency(m.config, m.module)
        if spectrum.shape[0] != n:
            raise ValueError(f"load_peft: {m.module!r} has {spectrum.shape[0]} wavelet "
                             f"coefficients in the file but n_frequency={n} in "
                             f"{m.source} (n_frequency/n_frequency_pattern)")
    seed = m.config.get("random_loc_seed", 777)
    if seed is None:
        raise ValueError(f"{m.source}: random_loc_seed=None (PEFT's positions need "
                         "a seed)")
    adapter = _adapters.waveft(
        n, scaling=float(m.config.get("scaling", 25.0)),
        wavelet_family=m.config.get("wavelet_family", "db1"),
        use_idwt=bool(m.config.get("use_idwt", True)), random_loc_seed=int(seed),
        dimension_numbers=m.dimension_numbers, param_dtype=m.dtype)
    idx = _adapters.fourierft_indices(m.dims.n_out, m.dims.n_in, n, int(seed))
    return (adapter, _adapters.WaveFTParams(jnp.asarray(spectrum, m.dtype)),
            _adapters.WaveFTIndices(jnp.asarray(idx)))


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    """The spectrum, and ``(n, scaling, wavelet_family, use_idwt, seed)``.

    The hyperparameters come from the adapter (``waveft`` records them), then
    are checked: the frozen positions must be PEFT's for that seed.
    """
    hp = dict(m.adapter.hyperparameters)
    if "wavelet_family" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.waveft adapter")
    n, seed = hp["n_frequency"], hp["random_loc_seed"]
    want = _adapters.fourierft_indices(m.dims.n_out, m.dims.n_in, n, seed)
    if not np.array_equal(np.asarray(jax.device_get(m.frozen.indices)), want):
        raise ValueError(f"save_peft: the frozen indices of {m.path!r} are not PEFT's "
                         f"positions for random_loc_seed={seed}; PEFT would "
                         "regenerate different ones")
    spectrum = np.ascontiguousarray(np.asarray(jax.device_get(m.trainable.spectrum)))
    return {"waveft_spectrum": spectrum}, (n, hp["scaling"], hp["wavelet_family"],
                                           hp["use_idwt"], seed)


def _config(per_module: Mapping[str, tuple]) -> tuple[dict, dict]:
    """``n_frequency`` (+ pattern) and the fields one PEFT adapter shares."""
    shared = {i[1:] for i in per_module.values()}
    if len(shared) > 1:
        raise ValueError("save_peft: one PEFT WaveFT adapter has one scaling, "
                         "wavelet_family, use_idwt and random_loc_seed; got "
                         f"{sorted(shared, key=repr)}")
    scaling, family, use_idwt, seed = shared.pop()
    common, pattern = _peft_config.most_common({m: i[0] for m, i in per_module.items()})
    return {"n_frequency": common, "n_frequency_pattern": pattern, "scaling": scaling,
            "wavelet_family": family, "use_idwt": use_idwt, "random_loc_seed": seed,
            "proportional_parameters": False, "fan_in_fan_out": False, "bias": "none",
            "init_weights": True}, {}


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


TUNER = _peft_tuner.Tuner(
    peft_type="WAVEFT",
    params_types=(_adapters.WaveFTParams,),
    suffixes=("waveft_spectrum",),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"n_frequency", "n_frequency_pattern", "scaling", "wavelet_family",
                        "use_idwt", "random_loc_seed", "proportional_parameters",
                        "init_weights", "layers_to_transform", "layers_pattern"}),
    defaults={"fan_in_fan_out": False, "bias": "none"},
    field_types={
        "n_frequency": (lambda v: _int(v) and v > 0, "a positive int"),
        "n_frequency_pattern": (lambda v: isinstance(v, dict) and all(
            _int(x) and x > 0 for x in v.values()), "an object of positive ints"),
        "random_loc_seed": (_int, "an int"),
        "wavelet_family": (lambda v: v in _adapters.waveft_wavelets(),
                           "one of " + ", ".join(_adapters.waveft_wavelets())),
        "use_idwt": (lambda v: isinstance(v, bool), "a bool"),
        "proportional_parameters": (lambda v: isinstance(v, bool), "a bool"),
        "scaling": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                    "a number"),
    },
)
