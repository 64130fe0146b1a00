"""PEFT RandLoRA (``peft_type: RANDLORA``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_randlora_make.py`` (torch side) and
``scripts/golden/peft_randlora_from_peftjax.py`` (peftjax side); the checks are
``tests/io/tuner_checks.py``'s.
"""

import pathlib

import numpy as np
import pytest

from peftjax import adapters, io
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_randlora"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_randlora_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "randlora", kind, scanned=scanned)
    # The bases are read once from base_model.randlora_A/B (not regenerated).
    tensors, _ = io.read_safetensors(GOLDEN / f"{kind}_randlora" /
                                     "adapter_model.safetensors")
    shared = ad.state.frozen[adapters.SHARED]
    np.testing.assert_array_equal(np.asarray(shared["randlora_A"]),
                                  tensors["base_model.randlora_A"][:, 0, :])
    np.testing.assert_array_equal(np.asarray(shared["randlora_B"]),
                                  tensors["base_model.randlora_B"])
    if kind == "llama":
        # r=4, randlora_alpha=2, projection_prng_key=7; q/v/up/down: s_max = 32
        assert shared["randlora_A"].shape == (4, 32)
        assert shared["randlora_B"].shape == (32, 8, 4)
        q = ("layers/self_attn/q_proj/kernel" if scanned
             else "layers/0/self_attn/q_proj/kernel")
        assert repr(ad.assignment[q]) == ("randlora(rank=4, alpha=2.0, seed=7, "
                                          "bases=dense, shared='randlora')")
    else:
        assert "bases=sparse" in repr(next(iter(ad.assignment.values())))


def test_randlora_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "randlora", tmp_path, {
        "save_projection": False, "fan_in_fan_out": True, "bias": "all"})


def test_peftjax_written_randlora_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "randlora", tmp_path)
    # save_peft sliced the 40-wide bases to PEFT's shapes for the written modules
    # (q/k/gate: largest (out, in) = (32, 16)) and wrote them once and per module.
    tensors, _ = io.read_safetensors(tmp_path / "pj_llama_randlora" /
                                     "adapter_model.safetensors")
    assert tensors["base_model.randlora_A"].shape == (4, 1, 16)
    assert tensors["base_model.randlora_B"].shape == (32, 4, 4)
    copy = "base_model.model.model.layers.1.mlp.gate_proj.randlora_B"
    np.testing.assert_array_equal(tensors[copy], tensors["base_model.randlora_B"])
