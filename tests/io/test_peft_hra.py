"""PEFT HRA (``peft_type: HRA``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_hra_make.py`` (torch side) and
``scripts/golden/peft_hra_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. The Llama file chains four plain
reflections, the BERT file uses the Gram-Schmidt variant; ``hra_u`` is stored
untransposed (it lives on the input side in both layouts).
"""

import pathlib

import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_hra"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_hra_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "hra", kind, scanned=scanned)
    a = next(iter(ad.assignment.values()))
    assert repr(a) == ("hra(rank=4)" if kind == "llama" else "hra(rank=2, apply_GS=True)")
    for t in ad.state.trainable.values():  # every loaded rotation is orthogonal
        u = h.f64(t.u).reshape((-1,) + t.u.shape[-2:])[0]
        rot = h.f64(adapters.hra_rotation(t.u.reshape((-1,) + t.u.shape[-2:])[0],
                                          apply_GS=kind == "bert"))
        np.testing.assert_allclose(rot.T @ rot, np.eye(u.shape[0]), atol=1e-5)


def test_hra_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "hra", tmp_path, {"bias": "all"})


def test_peftjax_written_hra_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "hra", tmp_path)
