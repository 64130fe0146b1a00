"""PEFT QA-LoRA (LoRA files with ``use_qalora``) both ways, against torch on the tiny
Llama and BERT.

Goldens: ``scripts/golden/peft_qalora_make.py`` (torch side: PEFT's
``QALoraLinearVariant`` on the float32 base; PEFT cannot merge it) and
``scripts/golden/peft_qalora_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. ``lora_A`` is ``(r, in/qalora_group_size)``.
"""

import pathlib

import pytest

from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_qalora"


# the scanned layout reads QA-LoRA as it reads LoRA (test_peft_bdlora.py and
# test_peft_monteclora.py load their variants scanned)
@pytest.mark.parametrize("kind,scanned", [("llama", False), ("bert", False)])
def test_peft_made_qalora_gives_torch_outputs(kind, scanned, tmp_path):
    ad = tc.check_peft_made(GOLDEN, "qalora", kind, scanned=scanned,
                            roundtrip=tmp_path if kind == "llama" and not scanned
                            else None)
    a = next(iter(ad.assignment.values()))
    assert repr(a) == ("qalora(rank=4, group_size=8, alpha=8, scaling=alpha/r)"
                       if kind == "llama" else
                       "qalora(rank=2, group_size=4, alpha=6, scaling=alpha/sqrt(r))")


def test_qalora_config_fields_not_honoured_are_refused(tmp_path):
    # a group size that disagrees with lora_A's shape is an error naming it too
    tc.check_refused(GOLDEN, "qalora", tmp_path, {"lora_bias": True,
                                                 "qalora_group_size": 4})


def test_peftjax_written_qalora_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "qalora", tmp_path)
