"""PEFT MiCA (``init_lora_weights="mica"``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_mica_make.py`` (torch side: PEFT's own
``mica_init``, then ``lora_A`` perturbed) and
``scripts/golden/peft_mica_from_peftjax.py`` (peftjax side); the shared
checks are ``tests/io/tuner_checks.py``'s. A MiCA file reads as
``inits.mica``'s adapter: ``lora_A.T`` trains, ``lora_B.T`` is its frozen
basis, so the trainable count is PEFT's ``r·in`` per module.
"""

import pathlib

import jax
import numpy as np
import pytest

from peftjax import inits, tree
from tests import helpers as h
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_mica"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_mica_gives_torch_outputs(kind, scanned, tmp_path):
    ad = tc.check_peft_made(GOLDEN, "mica", kind, scanned=scanned,
                            roundtrip=None if scanned else tmp_path)
    for t in ad.state.trainable.values():
        assert isinstance(t, inits.MiCAParams)
    if kind == "llama" and not scanned:  # PEFT's frozen B is our own init's (up to signs)
        _, params, _, _ = tc.load(kind, scanned=False)
        leaves = tree.leaves_by_path(params)
        for path, adapter in ad.assignment.items():
            _, f = adapter.init(jax.random.key(0), leaves[path])
            mine, theirs = h.f64(f.b), h.f64(ad.state.frozen[path].b)
            signs = np.sign(np.sum(mine * theirs, axis=-1, keepdims=True))
            np.testing.assert_allclose(mine * signs, theirs, rtol=0, atol=1e-5)


def test_mica_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "mica", tmp_path, {"bias": "all"})


def test_peftjax_written_mica_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "mica", tmp_path)
