"""PEFT BD-LoRA (LoRA files with ``use_bdlora``) both ways, against torch on the tiny
Llama and BERT.

Goldens: ``scripts/golden/peft_bdlora_make.py`` (torch side) and
``scripts/golden/peft_bdlora_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. The block-diagonal factor is PEFT's
``BlockDiagonalLinear`` weight (``(r, in/nb)`` for ``A``, ``(out, r/nb)`` for
``B``); the BERT files mix BD-LoRA and plain LoRA (``match_strict=False``).
"""

import pathlib

import pytest

from peftjax import adapters
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_bdlora"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_bdlora_gives_torch_outputs(kind, scanned, tmp_path):
    ad = tc.check_peft_made(GOLDEN, "bdlora", kind, scanned=scanned,
                            roundtrip=tmp_path if kind == "llama" and not scanned
                            else None)
    sides = {p.split("/")[-2]: dict(a.hyperparameters).get("block_diagonal")
             for p, a in ad.assignment.items()}
    assert sides == ({"q_proj": "b", "up_proj": "b", "o_proj": "a", "down_proj": "a"}
                     if kind == "llama" else {"query": "b", "key": None, "output": "a"})
    for p, t in ad.state.trainable.items():
        assert isinstance(t, adapters.LoRAParams if "key" in p else adapters.BdLoRAParams)


def test_bdlora_config_fields_not_honoured_are_refused(tmp_path):
    # nblocks that disagrees with the tensors, and a module neither side matches
    tc.check_refused(GOLDEN, "bdlora", tmp_path, {
        "use_bdlora": {"target_modules_bd_a": ["o_proj", "down_proj"],
                       "target_modules_bd_b": ["q_proj"], "nblocks": 2}})
    (tmp_path / "n").mkdir()
    tc.check_refused(GOLDEN, "bdlora", tmp_path / "n", {
        "use_bdlora": {"target_modules_bd_a": ["o_proj", "down_proj"],
                       "target_modules_bd_b": ["q_proj", "up_proj"], "nblocks": 4}})

def test_peftjax_written_bdlora_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "bdlora", tmp_path)
