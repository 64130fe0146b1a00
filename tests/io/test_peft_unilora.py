"""PEFT UniLoRA (``peft_type: UNILORA``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_unilora_make.py`` (torch side: PEFT's default
``save_indices=False``, so the file holds ``theta_d`` only and peftjax must
regenerate PEFT's index assignment in the torch module order) and
``scripts/golden/peft_unilora_from_peftjax.py`` (peftjax side, written with
``save_indices=True``); the checks are ``tests/io/tuner_checks.py``'s.
"""

import pathlib

import numpy as np
import pytest
from safetensors.numpy import load_file

from peftjax import adapters
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_unilora"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_unilora_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "unilora", kind, scanned=scanned)
    files = load_file(str(GOLDEN / f"{kind}_unilora" / "adapter_model.safetensors"))
    assert list(files) == ["base_model.unilora_theta_d"]  # no indices in the file
    theta = ad.state.trainable[adapters.SHARED]["unilora"]
    np.testing.assert_array_equal(np.asarray(theta), files["base_model.unilora_theta_d"])
    # Every entry of theta_d is used ⌊D/d⌋ or ⌈D/d⌉ times over all modules.
    idx = np.concatenate([np.asarray(f.indices_a).ravel() for f in ad.state.frozen.values()]
                         + [np.asarray(f.indices_b).ravel()
                            for f in ad.state.frozen.values()])
    counts = np.bincount(idx, minlength=theta.shape[0])
    assert counts.max() - counts.min() <= 1 and counts.min() > 0


def test_unilora_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "unilora", tmp_path, {"fan_in_fan_out": True,
                                                   "bias": "all"})


def test_peftjax_written_unilora_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "unilora", tmp_path)
