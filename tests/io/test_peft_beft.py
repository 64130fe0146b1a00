"""PEFT BEFT (``peft_type: BEFT``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_beft_make.py`` (torch side) and
``scripts/golden/peft_beft_from_peftjax.py`` (peftjax side); the shared
checks are ``tests/io/tuner_checks.py``'s. PEFT's Llama file shifts the
outputs of biasless projections, which have no leaf in weight space: peftjax
refuses it, naming the path.
"""

import pathlib

import numpy as np
import pytest

from peftjax import adapters, io, tree
from tests import helpers as h
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_beft"


def test_peft_made_beft_gives_torch_outputs(tmp_path):
    ad = tc.check_peft_made(GOLDEN, "beft", "bert", scanned=False, roundtrip=tmp_path)
    _, params, _, _ = tc.load("bert")
    flat = tree.leaves_by_path(params)
    merged = tree.leaves_by_path(tc.materialized(ad.assignment, params, ad.state))
    file, _ = io.read_safetensors(GOLDEN / "bert_beft" / "adapter_model.safetensors")
    v = "layers/0/attention/value/kernel"
    assert repr(ad.assignment[v]) == "beft(init_weights=True)"
    beta = file["base_model.model.encoder.layer.0.attention.self.value.beft_bias"]
    np.testing.assert_allclose(h.f64(merged[v.replace("kernel", "bias")]),
                               h.f64(flat[v.replace("kernel", "bias")]) + h.f64(beta[0]),
                               **h.ELEMENTWISE_F32)
    np.testing.assert_array_equal(np.asarray(merged[v]), np.asarray(flat[v]))


@pytest.mark.parametrize("scanned", [False, True])
def test_peft_made_llama_beft_is_refused_naming_the_biasless_path(scanned):
    _, params, key_map, _ = tc.load("llama", scanned=scanned)
    ad = io.load_peft(GOLDEN / "llama_beft", params, key_map=key_map)
    with pytest.raises(ValueError, match="q_proj/kernel.*no leaf '.*q_proj/bias'"):
        adapters.materialize(ad.assignment, params, *ad.state)


def test_beft_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "beft", tmp_path, {"init_weights": "yes"},
                     kind="bert")


def test_peftjax_written_beft_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "beft", tmp_path)
