"""PEFT FRoD (``peft_type: FROD``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_frod_make.py`` (torch side) and
``scripts/golden/peft_frod_from_peftjax.py`` (peftjax side: PEFT's bases with new
``λ``/``S`` values, as PEFT recomputes ``U`` from the basis it regenerates); the
shared checks are ``tests/io/tuner_checks.py``'s. The Llama categories take PEFT's
QR branch; the BERT file adapts the second layer only, its ``output.dense`` by the
SVD branch. ``U`` is recomputed from the base kernel in float64, as PEFT does.
"""

import contextlib
import pathlib

import pytest

from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_frod"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_frod_gives_torch_outputs(kind, scanned, tmp_path):
    roundtrip = tmp_path / "back" if (kind, scanned) == ("llama", False) else None
    warns = (pytest.warns(UserWarning, match="FRoD files: when PEFT loads")
             if roundtrip is not None else contextlib.nullcontext())
    with warns:  # save_peft says how PEFT rebuilds U
        ad = tc.check_peft_made(GOLDEN, "frod", kind, scanned=scanned, roundtrip=roundtrip)
    groups = sorted(k.split("/")[0] for k in ad.state.frozen["@shared"])
    assert groups == sorted(2 * (["mlp_down_proj", "self_attn_q_proj", "self_attn_v_proj"]
                                 if kind == "llama" else
                                 ["attention_output", "intermediate_dense", "output_dense",
                                  "self_query", "self_value"]))


def test_frod_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "frod", tmp_path, {"save_projection": False, "bias": "all",
                                                "fan_in_fan_out": True})


def test_peftjax_written_frod_loads_in_peft_with_peftjax_outputs(tmp_path):
    with pytest.warns(UserWarning, match="FRoD files: when PEFT loads"):
        tc.check_peftjax_written(GOLDEN, "frod", tmp_path)
