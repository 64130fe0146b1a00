"""PEFT KaSA (LoRA files with ``kasa_config``) both ways, against torch on the tiny
Llama and BERT.

Goldens: ``scripts/golden/peft_kasa_make.py`` (torch side: PEFT truncates the
base weights when it builds or loads the adapter) and
``scripts/golden/peft_kasa_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. The file holds ``lora_A``, ``lora_B`` and
``lora_diag``; the truncation is rebuilt from the base weights on reading.
"""

import pathlib

import pytest

from peftjax import adapters
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_kasa"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_kasa_gives_torch_outputs(kind, scanned, tmp_path):
    ad = tc.check_peft_made(GOLDEN, "kasa", kind, scanned=scanned,
                            roundtrip=tmp_path if kind == "llama" and not scanned
                            else None)
    for p, a in ad.assignment.items():
        assert isinstance(ad.state.trainable[p], adapters.KaSAParams)
        hp = dict(a.hyperparameters)
        assert (hp["beta"], hp["gamma"]) == ((2e-4, 5e-3) if kind == "llama"
                                             else (1e-4, 1e-3))
        assert hp["rank"] == (2 if "k_proj" in p else 4)


def test_kasa_config_fields_not_honoured_are_refused(tmp_path):
    # KaSA is the one LoRA variant of a module (PEFT resolves one per Linear)
    tc.check_refused(GOLDEN, "kasa", tmp_path, {"use_qalora": True})
    (tmp_path / "k").mkdir()
    tc.check_refused(GOLDEN, "kasa", tmp_path / "k", {"kasa_config": {"beta": -1.0}})


def test_peftjax_written_kasa_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "kasa", tmp_path)
