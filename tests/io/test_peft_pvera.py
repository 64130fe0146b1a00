"""PEFT PVeRA (``peft_type: PVERA``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_pvera_make.py`` (torch side, PEFT's evaluation
mode: the mean) and ``scripts/golden/peft_pvera_from_peftjax.py`` (peftjax
side); the checks are ``tests/io/tuner_checks.py``'s.
"""

import pathlib

import numpy as np
import pytest

from peftjax import adapters, io
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_pvera"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_pvera_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "pvera", kind, scanned=scanned)
    tensors, _ = io.read_safetensors(GOLDEN / f"{kind}_pvera" / "adapter_model.safetensors")
    shared = ad.state.frozen[adapters.SHARED]
    np.testing.assert_array_equal(np.asarray(shared["pvera_A"]),
                                  tensors["base_model.pvera_A"].T)
    np.testing.assert_array_equal(np.asarray(shared["pvera_B"]),
                                  tensors["base_model.pvera_B"].T)
    if kind == "llama":
        # r=4, d_initial=0.2, projection_prng_key=3; q/k/down: in_max = 32, out_max = 16
        assert shared["pvera_A"].shape == (32, 8) and shared["pvera_B"].shape == (4, 16)
        q = ("layers/self_attn/q_proj/kernel" if scanned
             else "layers/0/self_attn/q_proj/kernel")
        assert repr(ad.assignment[q]) == "pvera(rank=4, seed=3, shared='pvera')"


def test_pvera_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "pvera", tmp_path, {
        "save_projection": False, "sample_at_inference": True, "fan_in_fan_out": True})


def test_peftjax_written_pvera_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "pvera", tmp_path)
    # save_peft sliced the (20, 40)-sized matrices to the written widths
    # (q/v/up: in_max = 16, out_max = 32).
    tensors, _ = io.read_safetensors(tmp_path / "pj_llama_pvera" / "adapter_model.safetensors")
    assert tensors["base_model.pvera_A"].shape == (8, 16)
    assert tensors["base_model.pvera_B"].shape == (32, 4)
