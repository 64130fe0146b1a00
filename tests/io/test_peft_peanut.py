"""PEFT PEANUT (``peft_type: PEANUT``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_peanut_make.py`` (torch side) and
``scripts/golden/peft_peanut_from_peftjax.py`` (peftjax side); the checks are
``tests/io/tuner_checks.py``'s. The loaded adapter runs in its factored form
``x@W0 + s·(x@H(W0))@b`` with no fallback.
"""

import pathlib

import pytest

from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_peanut"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_peanut_gives_torch_outputs(kind, scanned, tmp_path):
    ad = tc.check_peft_made(GOLDEN, "peanut", kind, scanned=scanned,
                            roundtrip=tmp_path if kind == "bert" else None)
    q = ("layers/self_attn/q_proj/kernel" if scanned else "layers/0/self_attn/q_proj/kernel")
    if kind == "llama":
        # PEFT's config: r=4, depth=2, relu, scaling=0.5
        assert repr(ad.assignment[q]) == "peanut(rank=4, depth=2, act_fn=relu, scaling=0.5)"
        t = ad.state.trainable[q]
        assert t.encoders.shape[-3:] == (2, 4, 4) and t.decoders.shape[-3:] == (2, 4, 4)


def test_peanut_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "peanut", tmp_path, {"act_fn": "mish", "depth": 3})


def test_peftjax_written_peanut_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "peanut", tmp_path)
