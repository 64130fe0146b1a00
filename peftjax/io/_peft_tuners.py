# SPDX-License-Identifier: Apache-2.0
"""The PEFT weight-tuner types read and written through ``_peft_tuner.Tuner``.

One line per type (its module defines ``TUNER``); ``load_peft``,
``save_peft`` and ``check_config`` look a ``peft_type`` up here.

Exports: ``TUNERS``, ``for_params``.
"""

from typing import Any

from peftjax.io import (
    _peft_adamss,
    _peft_beft,
    _peft_boft,
    _peft_c3a,
    _peft_deft,
    _peft_delora,
    _peft_fourierft,
    _peft_frod,
    _peft_glora,
    _peft_gralora,
    _peft_hira,
    _peft_hra,
    _peft_loha,
    _peft_lokr,
    _peft_miss,
    _peft_oft,
    _peft_osf,
    _peft_peanut,
    _peft_psoft,
    _peft_pvera,
    _peft_randlora,
    _peft_road,
    _peft_shira,
    _peft_supertuning,
    _peft_tinylora,
    _peft_tuner,
    _peft_unilora,
    _peft_vblora,
    _peft_waveft,
)

TUNERS: dict[str, _peft_tuner.Tuner] = {t.peft_type: t for t in (
    _peft_adamss.TUNER,
    _peft_beft.TUNER,
    _peft_boft.TUNER,
    _peft_c3a.TUNER,
    _peft_deft.TUNER,
    _peft_delora.TUNER,
    _peft_fourierft.TUNER,
    _peft_frod.TUNER,
    _peft_glora.TUNER,
    _peft_gralora.TUNER,
    _peft_hira.TUNER,
    _peft_hra.TUNER,
    _peft_loha.TUNER,
    _peft_lokr.TUNER,
    _peft_miss.TUNER,
    _peft_oft.TUNER,
    _peft_osf.TUNER,
    _peft_peanut.TUNER,
    _peft_psoft.TUNER,
    _peft_pvera.TUNER,
    _peft_randlora.TUNER,
    _peft_road.TUNER,
    _peft_shira.TUNER,
    _peft_supertuning.TUNER,
    _peft_tinylora.TUNER,
    _peft_unilora.TUNER,
    _peft_vblora.TUNER,
    _peft_waveft.TUNER,
)}


def for_params(trainable: Any) -> _peft_tuner.Tuner | None:
    """The tuner whose ``params_types`` include ``type(trainable)``, or None.

    Args:
      trainable: one path's trainable parameters.

    Returns:
      The ``Tuner`` that writes them, or None.

    Example:
      >>> for_params(None) is None
      True
    """
    for tuner in TUNERS.values():
        if isinstance(trainable, tuner.params_types):
            return tuner
    return None
