"""PEFT DEFT (``peft_type: DEFT``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_deft_make.py`` (torch side) and
``scripts/golden/peft_deft_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. The Llama file uses the ``relu``
projector with ``alpha`` (its ``v_proj`` has ``out = 8``), the BERT one the
orthogonal ``qr`` projector; the peftjax-written files are ``qr`` (Llama) and
PaRa (BERT).
"""

import pathlib

import pytest

from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_deft"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_deft_gives_torch_outputs(kind, scanned, tmp_path):
    ad = tc.check_peft_made(GOLDEN, "deft", kind, scanned=scanned,
                            roundtrip=tmp_path if kind == "llama" and not scanned else None)
    assert {repr(a) for a in ad.assignment.values()} == (
        {"deft(rank=4, alpha=8.0)"} if kind == "llama" else {"deft(rank=3, decomposition='qr')"})


def test_deft_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "deft", tmp_path, {"deft_dropout": 0.1, "fan_in_fan_out": True,
                                                "bias": "all"})


def test_peftjax_written_deft_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "deft", tmp_path)
