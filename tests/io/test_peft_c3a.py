"""PEFT C3A (``peft_type: C3A``) both ways, against torch on the tiny models.

``tests/io/golden/peft_c3a/`` holds PEFT-made C3A adapters with every
``c3a_kernel`` perturbed away from its init (``scripts/golden/
peft_c3a_make.py``: block 8 with ``block_size_pattern`` block 4 on the
Llama's ``down_proj``, block 8 on BERT), torch's outputs (active and merged),
PEFT's trainable-parameter counts, and peftjax-written adapters that PEFT
loaded (``scripts/golden/peft_c3a_from_peftjax.py``; the max output
differences and tensor statistics are in ``peft.json``).
"""

import json
import pathlib

import pytest

from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_c3a"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True), ("bert", False)],
                         ids=["llama-unrolled", "llama-scanned", "bert"])
def test_peft_made_c3a_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "c3a", kind, scanned=scanned)
    if kind == "llama":  # block_size=8, block_size_pattern={"down_proj": 4}
        pre = "layers/" if scanned else "layers/1/"
        assert ad.state.trainable[pre + "self_attn/q_proj/kernel"].kernel.shape[-3:] == \
            (2, 2, 8)
        assert ad.state.trainable[pre + "mlp/down_proj/kernel"].kernel.shape[-3:] == \
            (4, 8, 4)


def test_peftjax_written_c3a_is_what_peft_verified(tmp_path):
    tc.check_peftjax_written(GOLDEN, "c3a", tmp_path)
    cfg = json.loads((tmp_path / "pj_llama_c3a" / "adapter_config.json").read_text())
    assert cfg["block_size"] == 8 and set(cfg["block_size_pattern"].values()) == {4}


def test_c3a_config_fields_not_honoured_are_refused(tmp_path):
    # bias only at PEFT's default; a block_size that disagrees with the file's
    # kernels is an error naming the field.
    tc.check_refused(GOLDEN, "c3a", tmp_path, {"bias": "all", "block_size": 4})

