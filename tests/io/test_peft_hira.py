"""PEFT HiRA (``peft_type: HIRA``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_hira_make.py`` (torch side) and
``scripts/golden/peft_hira_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. A loaded HiRA adapter has no factored
form (the factored path materialises it); the same tensors under
``hira(..., factored_matmuls=True)`` give PEFT's outputs through the
``r``-matmul factored form with no fallback.
"""

import json
import pathlib
import warnings

import jax
import numpy as np
import pytest

from peftjax import adapters, factored, io
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_hira"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_hira_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "hira", kind, scanned=scanned, fallback=True)
    if kind == "llama":
        # rank_pattern {"down_proj": 2}: PEFT 0.21.2 builds down_proj with r=4 anyway
        d = "layers/mlp/down_proj/kernel" if scanned else "layers/0/mlp/down_proj/kernel"
        assert repr(ad.assignment[d]) == "hira(rank=4, init=kaiming_uniform)"
    if kind == "llama" and not scanned:
        return  # the r-matmul form: checked on the scanned Llama and on BERT
    _, params, _, fwd = tc.load(kind, scanned=scanned)
    assignment = {p: adapters.hira(dict(a.hyperparameters)["rank"], factored_matmuls=True,
                                   dimension_numbers=a.dimension_numbers)
                  for p, a in ad.assignment.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the r-matmul form takes no fallback
        got = jax.jit(lambda t, f: factored.transform(
            lambda p, _: fwd(p), assignment, t, f)(params, None))(*ad.state)
    want = np.load(GOLDEN / "torch_outputs.npz")[f"{kind}_hira"]
    tc.assert_outputs_close(kind, got, want)


def test_hira_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "hira", tmp_path, {"fan_in_fan_out": True})


def test_hira_dropout_loads_as_the_factored_form(tmp_path):
    src = GOLDEN / "bert_hira"
    cfg = json.loads((src / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "hira_dropout": 0.1}))
    (tmp_path / "adapter_model.safetensors").write_bytes(
        (src / "adapter_model.safetensors").read_bytes())
    _, params, key_map, _ = tc.load("bert")
    ad = io.load_peft(tmp_path, params, key_map=key_map)
    a = next(iter(ad.assignment.values()))
    assert a.factored is not None and a.dropout == 0.1


def test_save_peft_refuses_two_hira_ranks(tmp_path):
    _, params, key_map, _ = tc.load("bert")
    from peftjax import tree

    a = tree.assign(params, [
        tree.Rule(where="layers/0/attention/query/kernel", then=adapters.hira(2)),
        tree.Rule(where="layers/0/attention/key/kernel", then=adapters.hira(3))])
    st = adapters.init(a, jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"rank \d and \[\d\].*ignores rank_pattern"):
        io.save_peft(tmp_path / "x", a, st, params, key_map=key_map)


def test_peftjax_written_hira_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "hira", tmp_path)
