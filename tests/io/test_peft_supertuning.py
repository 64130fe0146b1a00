"""PEFT Super-Tuning (``peft_type: SUPERTUNING``) both ways, against torch (tiny Llama, BERT).

Goldens: ``scripts/golden/peft_supertuning_make.py`` (torch side) and
``scripts/golden/peft_supertuning_from_peftjax.py`` (peftjax side); the
checks are ``tests/io/tuner_checks.py``'s, plus: the supports PEFT saved
(``torch.topk`` of ``|W|``; Llama the largest with a Supra LoRA, BERT the
smallest) are the ones ``adapters.supertuning`` selects from the base weights.
"""

import pathlib

import jax
import numpy as np
import pytest

from peftjax import adapters
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_supertuning"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_supertuning_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "supertuning", kind, scanned=scanned)
    reprs = {repr(a) for a in ad.assignment.values() if a is not None}
    assert reprs == ({"supertuning(sparsity=0.9, select_top=True, r=2, lora_alpha=6.0)"}
                     if kind == "llama" else
                     {"supertuning(sparsity=0.95, select_top=False)"})
    _, params, _, _ = tc.load(kind, scanned=scanned)
    fresh = adapters.init(ad.assignment, jax.random.key(0), params)
    assert len(ad.state.frozen) == (3 if scanned else 6 if kind == "llama" else 10)
    for path, f in ad.state.frozen.items():
        np.testing.assert_array_equal(np.asarray(fresh.frozen[path].indices),
                                      np.asarray(f.indices), err_msg=path)


def test_supertuning_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "supertuning", tmp_path,
                     {"lora_dropout": 0.1, "save_precomputed_indices": False})


def test_peftjax_written_supertuning_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "supertuning", tmp_path)
