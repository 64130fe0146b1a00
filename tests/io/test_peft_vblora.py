"""PEFT VB-LoRA (``peft_type: VBLORA``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_vblora_make.py`` (torch side) and
``scripts/golden/peft_vblora_from_peftjax.py`` (peftjax side); the checks are
``tests/io/tuner_checks.py``'s. The bank is one shared trainable array
(``trainable["@shared"]["vblora"]``), counted once as PEFT counts it. PEFT's
BERT file is a ``save_only_topk_weights`` file (top-k indices and weights).
"""

import pathlib

import numpy as np
import pytest

from peftjax import adapters
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_vblora"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_vblora_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "vblora", kind, scanned=scanned)
    shared = ad.state.trainable[adapters.SHARED]
    assert list(shared) == ["vblora"]
    assert shared["vblora"].shape == ((6, 8) if kind == "llama" else (5, 8))
    q = next(p for p in ad.assignment if "q" in p.rsplit("/", 2)[-2])
    assert ad.state.trainable[q].bank == adapters.Shared("vblora")
    logits = np.asarray(ad.state.trainable[q].logits_a)
    if kind == "llama":
        assert np.isfinite(logits).all()
    else:  # PEFT's save_only_topk_weights file: logits at the top 3 of 5 only
        assert (np.isfinite(logits).sum(-1) == 3).all()


def test_vblora_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "vblora", tmp_path, {"fan_in_fan_out": True,
                                                  "bias": "all"})


def test_peftjax_written_vblora_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "vblora", tmp_path)
