"""PEFT BOFT (``peft_type: BOFT``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_boft_make.py`` (torch side, with a pure-torch
stand-in of PEFT's CUDA block-diagonal kernel so that PEFT builds several
butterfly factors on the CPU) and ``scripts/golden/peft_boft_from_peftjax.py``
(peftjax side); the shared checks are ``tests/io/tuner_checks.py``'s. The
Llama file has three factors of blocks of 2, the BERT file two factors of 4
blocks (blocks of 4 and, on the 24-wide ``output.dense``, of 6). The factored
path rotates the input (``in_map``) and scales the outputs (``out_scale``).
"""

import json
import pathlib

import pytest

from peftjax import io
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_boft"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_boft_gives_torch_outputs(kind, scanned, tmp_path):
    roundtrip = tmp_path / "back" if (kind, scanned) == ("llama", False) else None
    ad = tc.check_peft_made(GOLDEN, "boft", kind, scanned=scanned, roundtrip=roundtrip)
    shapes = {p: (tuple(t.r.shape[-4:]), t.s.shape[-1])
              for p, t in ad.state.trainable.items()}
    if kind == "bert":  # boft_block_num=4, two factors: 16 -> blocks of 4, 24 -> of 6
        wide = {p for p in shapes if p.endswith("/output/kernel")
                and "/attention/" not in p}
        assert wide and {shapes[p][0] for p in wide} == {(2, 4, 6, 6)}
        assert {shapes[p][0] for p in shapes if p not in wide} == {(2, 4, 4, 4)}
        assert all(repr(a) == "boft(block_num=4, n_butterfly_factor=2)"
                   for a in ad.assignment.values() if a is not None)
    else:  # boft_block_size=2, three factors: 16 -> 8 blocks, down_proj's 32 -> 16
        assert {s for p, s in shapes.items() if "down_proj" in p} == {((3, 16, 2, 2), 16)}
        assert {s[0] for p, s in shapes.items() if "down_proj" not in p} == {(3, 8, 2, 2)}


def test_boft_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "boft", tmp_path, {"boft_dropout": 0.1, "bias": "all",
                                                "fan_in_fan_out": True})


def test_boft_layout_peft_refuses_is_an_error_naming_the_module(tmp_path):
    # boft_block_size=3 divides no input (16 or 32 wide): PEFT raises, so does peftjax
    _, params, key_map, _ = tc.load("llama")
    src = GOLDEN / "llama_boft"
    cfg = json.loads((src / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "boft_block_size": 3}))
    (tmp_path / "adapter_model.safetensors").write_bytes(
        (src / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"in_features \(32\) must be divisible by "
                       r"block_size \(3\).*module 'model\.layers\.0\.mlp\.down_proj'"):
        io.load_peft(tmp_path, params, key_map=key_map)


def test_peftjax_written_boft_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "boft", tmp_path)
