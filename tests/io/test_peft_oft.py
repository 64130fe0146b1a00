"""PEFT OFT (``peft_type: OFT``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_oft_make.py`` (torch side) and
``scripts/golden/peft_oft_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. The BERT file asks for blocks of 7, which
divide no module: PEFT uses 8 on the 16-wide inputs and 6 on the 24-wide
``output.dense``, and so does peftjax. The factored path rotates the input
(``in_map``) and never forms ``R·W``.
"""

import contextlib
import pathlib

import pytest

from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_oft"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_oft_gives_torch_outputs(kind, scanned, tmp_path):
    roundtrip = tmp_path / "back" if (kind, scanned) == ("llama", False) else None
    warns = (pytest.warns(UserWarning, match="block_size=7 does not divide")
             if kind == "bert" else contextlib.nullcontext())
    with warns:
        ad = tc.check_peft_made(GOLDEN, "oft", kind, scanned=scanned, roundtrip=roundtrip)
    shapes = {p: tuple(t.q.shape[-2:]) for p, t in ad.state.trainable.items()}
    if kind == "bert":  # PEFT's adjusted blocks: 16 -> 2 blocks of 8, 24 -> 4 of 6
        assert {s for p, s in shapes.items() if not p.endswith("/0/output/kernel")
                and not p.endswith("/1/output/kernel")} == {(2, 28)}
        assert {s for p, s in shapes.items() if p.endswith("/0/output/kernel")
                or p.endswith("/1/output/kernel")} == {(4, 15)}
        assert all(repr(a).startswith("oft(block_size=7, coft=True")
                   for a in ad.assignment.values() if a is not None)
    else:  # oft_block_size=4: 16 -> 4 blocks, down_proj's 32 -> 8 blocks
        assert {s for p, s in shapes.items() if "down_proj" in p} == {(8, 6)}
        assert {s for p, s in shapes.items() if "down_proj" not in p} == {(4, 6)}


def test_oft_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "oft", tmp_path, {"module_dropout": 0.1, "bias": "all"})


def test_peftjax_written_oft_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "oft", tmp_path)
