"""PEFT DeLoRA (``peft_type: DELORA``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_delora_make.py`` (torch side) and
``scripts/golden/peft_delora_from_peftjax.py`` (peftjax side); the shared
checks are ``tests/io/tuner_checks.py``'s. PEFT saves the frozen base norms
(``delora_w_norm``): the loaded ones are the file's, and equal the base's.
"""

import pathlib

import numpy as np
import pytest

from peftjax import tree
from tests import helpers as h
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_delora"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_delora_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "delora", kind, scanned=scanned)
    _, params, _, _ = tc.load(kind, scanned=scanned)
    flat = tree.leaves_by_path(params)
    for path, f in ad.state.frozen.items():  # PEFT's buffer: ‖W0‖ per input feature
        np.testing.assert_allclose(h.f64(f.w_norm),
                                   np.linalg.norm(h.f64(flat[path]), axis=-1),
                                   **h.MATMUL_F32)
    if kind == "llama":
        # PEFT's config: r=4, delora_lambda=2, rank_pattern down_proj=2, lambda_pattern v_proj=3
        q = ("layers/self_attn/q_proj/kernel" if scanned
             else "layers/0/self_attn/q_proj/kernel")
        d = q.replace("self_attn/q_proj", "mlp/down_proj")
        v = q.replace("q_proj", "v_proj")
        assert repr(ad.assignment[q]) == "delora(rank=4, delora_lambda=2.0)"
        assert repr(ad.assignment[d]) == "delora(rank=2, delora_lambda=2.0)"
        assert repr(ad.assignment[v]) == "delora(rank=4, delora_lambda=3.0)"


def test_delora_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "delora", tmp_path, {"bias": "all"})


def test_peftjax_written_delora_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "delora", tmp_path)
