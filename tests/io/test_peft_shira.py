"""PEFT SHiRA (``peft_type: SHIRA``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_shira_make.py`` (torch side) and
``scripts/golden/peft_shira_from_peftjax.py`` (peftjax side); the checks are
``tests/io/tuner_checks.py``'s, plus: the masks PEFT saved are the ones
``adapters.shira_indices`` regenerates from the config's seed.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from peftjax import adapters, io, tree
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_shira"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_shira_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "shira", kind, scanned=scanned)
    cfg = json.loads((GOLDEN / f"{kind}_shira" / "adapter_config.json").read_text())
    tensors, _ = io.read_safetensors(GOLDEN / f"{kind}_shira" / "adapter_model.safetensors")
    masks = {k: v for k, v in tensors.items() if k.endswith(".shira_indices")}
    assert len(masks) == (6 if kind == "llama" else 10)
    # PEFT's saved masks (random_seed 13; None = torch's default seed) are
    # the ones peftjax draws: the loaded frozen state equals a fresh init
    assert all(v.dtype == np.int32 for v in masks.values())
    _, params, _, _ = tc.load(kind, scanned=scanned)
    fresh = adapters.init(ad.assignment, jax.random.key(0), params)
    for path, f in ad.state.frozen.items():
        np.testing.assert_array_equal(np.asarray(fresh.frozen[path].indices),
                                      np.asarray(f.indices), err_msg=path)
        w = np.shape(tree.leaves_by_path(params)[path])
        out_f, in_f = w[-1], w[-2]
        want = adapters.shira_indices(out_f, in_f, cfg["r"], cfg["random_seed"])
        np.testing.assert_array_equal(np.asarray(f.indices).reshape((-1,) + want.shape)[0],
                                      want, err_msg=path)


def test_shira_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "shira", tmp_path, {"fan_in_fan_out": True, "r": 3})


def test_peftjax_written_shira_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "shira", tmp_path)
