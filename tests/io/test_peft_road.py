"""PEFT RoAd (``peft_type: ROAD``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_road_make.py`` (torch side) and
``scripts/golden/peft_road_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. The variants ``road_1`` (Llama, groups of
4), ``road_4`` (BERT, groups of 8) and, written by peftjax, ``road_2`` (Llama,
groups of 8) and ``road_1`` (BERT, groups of 2). The BERT modules have
biases: PEFT rotates them with the output (and merges ``R·b``), and so does
peftjax on every path (materialized, factored, folded).
"""

import pathlib

import pytest

from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_road"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_road_gives_torch_outputs(kind, scanned, tmp_path):
    roundtrip = tmp_path / "back" if (kind, scanned) == ("llama", False) else None
    ad = tc.check_peft_made(GOLDEN, "road", kind, scanned=scanned, roundtrip=roundtrip)
    sizes = {p: t.theta.shape[-1] for p, t in ad.state.trainable.items()}
    if kind == "bert":  # road_4: 2·out per tensor; intermediate.dense has 24 outputs
        assert {s for p, s in sizes.items() if "intermediate" in p} == {48}
        assert {s for p, s in sizes.items() if "intermediate" not in p} == {32}
        assert all(repr(a) == "road(road_4, group_size=8)"
                   for a in ad.assignment.values() if a is not None)
    else:  # road_1: out/2 per tensor (q_proj, down_proj 16; v_proj 8)
        assert {s for p, s in sizes.items() if "v_proj" in p} == {4}
        assert {s for p, s in sizes.items() if "v_proj" not in p} == {8}


def test_road_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "road", tmp_path, {"variant": "road_3", "group_size": 3,
                                                 "layers_to_transform": [0]})


def test_peftjax_written_road_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "road", tmp_path)
