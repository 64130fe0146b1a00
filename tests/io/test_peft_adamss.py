"""PEFT AdaMSS (``peft_type: ADAMSS``) both ways, against torch on the tiny Llama.

Goldens: ``scripts/golden/peft_adamss_make.py`` (torch side) and
``scripts/golden/peft_adamss_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. PEFT's file (``r=6`` below every module's
output size) stores no groups: ``load_peft`` recomputes PEFT's k-means groups
from ``adamss_newB`` and the base weight. Shapes whose groups PEFT cannot
reproduce itself are refused both ways. PEFT's BERT file (its layers have
biases, which PEFT appends to ``W`` before the SVD) loads with ``bias=True``
and writes back; a fresh peftjax adapter on a biased layer is refused (its
init sees the kernel only).
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from peftjax import adapters, io, tree
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_adamss"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_adamss_gives_torch_outputs(kind, scanned, tmp_path):
    # the roundtrip writes PEFT's own sketch basis back (r=6 < min(in, out))
    ad = tc.check_peft_made(GOLDEN, "adamss", kind, scanned=scanned,
                            roundtrip=None if scanned else tmp_path)
    assert repr(next(iter(ad.assignment.values()))) == (
        "adamss(rank=6, num_subspaces=4)" if kind == "llama"
        else "adamss(rank=6, num_subspaces=3, bias=True)")
    if kind == "bert":  # PEFT's SVD of [W | b]: the update moves the biases too
        assert all(float(np.abs(np.asarray(f.bias_basis)).max()) > 0.01
                   for f in ad.state.frozen.values())


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
    # a fresh adapter on BERT's biased layers: PEFT's SVD is of [W | b], peftjax's
    # init sees the kernel only
    _, bert, bert_map, _ = tc.load("bert")
    ab = tree.assign(bert, [tree.Rule(where="layers/0/attention/query/kernel",
                                      then=adapters.adamss(6, bias=True))])
    with pytest.raises(ValueError, match="has a bias"):
        io.save_peft(tmp_path / "bert", ab, adapters.init(ab, jax.random.key(0), bert), bert,
                     key_map=bert_map)
    # save_peft: a truncated SVD (rank < min(in, out)) is PEFT's random sketch
    a = tree.assign(params, [tree.Rule(where="layers/0/mlp/up_proj/kernel",
                                       then=adapters.adamss(6))])
    state = adapters.init(a, jax.random.key(0), params)
    with pytest.raises(ValueError, match="randomised sketch"):
        io.save_peft(tmp_path / "out", a, state, params, key_map=key_map)


def test_peftjax_written_adamss_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "adamss", tmp_path)
