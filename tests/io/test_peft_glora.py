"""PEFT GLoRA (``peft_type: GLORA``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_glora_make.py`` (torch side) and
``scripts/golden/peft_glora_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. The Llama file has lora ``A``/``B`` and
PEFT's empty ``C``/``D``/``E`` (``zeros`` buffers: no bias); the BERT file has
vector ``A``/``B``, lora ``C`` and vector ``D``/``E`` on the biased layers.
"""

import pathlib

import pytest

from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_glora"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_glora_gives_torch_outputs(kind, scanned, tmp_path):
    roundtrip = None if scanned else tmp_path / "back"
    ad = tc.check_peft_made(GOLDEN, "glora", kind, scanned=scanned, roundtrip=roundtrip)
    a = next(iter(ad.assignment.values()))
    assert repr(a) == (
        "glora(rank=4, config_A_B='lora', config_C='none', config_D_E='none')"
        if kind == "llama" else
        "glora(rank=2, config_A_B='vector', config_C='lora', config_D_E='vector')")


def test_glora_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "glora", tmp_path, {"bias": "all", "config_A_B": "vector"})


def test_peftjax_written_glora_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "glora", tmp_path)
