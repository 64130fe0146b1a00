"""PEFT LoHa (``peft_type: LOHA``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_loha_make.py`` (torch side) and
``scripts/golden/peft_loha_from_peftjax.py`` (peftjax side); the checks are
``tests/io/tuner_checks.py``'s.
"""

import pathlib

import pytest

from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_loha"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_loha_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "loha", kind, scanned=scanned)
    if kind == "llama":
        # PEFT's config: r=4, alpha=8, rank_pattern down_proj=2, alpha_pattern v_proj=6
        q = ("layers/self_attn/q_proj/kernel" if scanned
             else "layers/0/self_attn/q_proj/kernel")
        d = q.replace("self_attn/q_proj", "mlp/down_proj")
        v = q.replace("q_proj", "v_proj")
        assert repr(ad.assignment[q]) == "loha(rank=4, alpha=8)"
        assert repr(ad.assignment[d]) == "loha(rank=2, alpha=8)"
        assert repr(ad.assignment[v]) == "loha(rank=4, alpha=6)"


def test_loha_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "loha", tmp_path, {
        "rank_dropout": 0.1, "module_dropout": 0.2, "use_effective_conv2d": True})


def test_peftjax_written_loha_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "loha", tmp_path)
