"""PEFT AdaMSS (``peft_type: ADAMSS``) both ways, against torch on the tiny Llama.

Goldens: ``scripts/golden/peft_adamss_make.py`` (torch side) and
``scripts/golden/peft_adamss_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. PEFT's file (``r=6`` below every module's
output size) stores no groups: ``load_peft`` recomputes PEFT's k-means groups
from ``adamss_newB`` and the base weight. Shapes whose groups PEFT cannot
reproduce itself are refused both ways, and so is PEFT's BERT file (its
layers have biases, which PEFT folds into the SVD).
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from peftjax import adapters, io, tree
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_adamss"


@pytest.mark.parametrize("scanned", [False, True])
def test_peft_made_adamss_gives_torch_outputs(scanned, tmp_path):
    # the roundtrip writes PEFT's own sketch basis back (r=6 < min(in, out))
    ad = tc.check_peft_made(GOLDEN, "adamss", "llama", scanned=scanned,
                            roundtrip=None if scanned else tmp_path)
    assert repr(next(iter(ad.assignment.values()))) == "adamss(rank=6, num_subspaces=4)"


def test_adamss_refusals(tmp_path):
    tc.check_refused(GOLDEN, "adamss", tmp_path, {"num_subspaces": 3})
    _, params, key_map, _ = tc.load("llama")
    src = GOLDEN / "llama_adamss"
    cfg = json.loads((src / "adapter_config.json").read_text())
    # r >= out on q_proj (16 x 16): PEFT's groups follow rounding; refused by name
    d = tmp_path / "full"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16,
                                                        "target_modules": ["q_proj"]}))
    tensors, _ = io.read_safetensors(src / "adapter_model.safetensors")
    q = {k: (np.zeros((16, 16), np.float32) if k.endswith("newB") else v)
         for k, v in tensors.items() if "q_proj" in k}
    io.write_safetensors(d / "adapter_model.safetensors", q)
    with pytest.raises(ValueError, match="equidistant"):
        io.load_peft(d, params, key_map=key_map)
    # PEFT's BERT file: its Linear layers have biases, folded into PEFT's SVD
    _, bert, bert_map, _ = tc.load("bert")
    with pytest.raises(ValueError, match="with a bias"):
        io.load_peft(GOLDEN / "bert_adamss", bert, key_map=bert_map)
    # save_peft: a truncated SVD (rank < min(in, out)) is PEFT's random sketch
    a = tree.assign(params, [tree.Rule(where="layers/0/mlp/up_proj/kernel",
                                       then=adapters.adamss(6))])
    state = adapters.init(a, jax.random.key(0), params)
    with pytest.raises(ValueError, match="randomised sketch"):
        io.save_peft(tmp_path / "out", a, state, params, key_map=key_map)


def test_peftjax_written_adamss_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "adamss", tmp_path)
