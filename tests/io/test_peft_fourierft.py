"""PEFT FourierFT (``peft_type: FOURIERFT``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_fourierft_make.py`` (torch side:
``n_frequency_pattern`` on both models, non-default ``scaling`` and
``random_loc_seed`` on the Llama, PEFT's default seed on BERT; PEFT's own
frequency positions recorded as ``indices/<model>/<module>``) and
``scripts/golden/peft_fourierft_from_peftjax.py`` (peftjax side); the
checks are ``tests/io/tuner_checks.py``'s.
"""

import json
import pathlib

import numpy as np
import pytest

from peftjax import adapters, io
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_fourierft"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True), ("bert", False)],
                         ids=["llama-unrolled", "llama-scanned", "bert"])
def test_peft_made_fourierft_gives_torch_outputs(kind, scanned, tmp_path):
    # and PEFT -> peftjax -> PEFT writes PEFT's own spectra back
    ad = tc.check_peft_made(GOLDEN, "fourierft", kind, scanned=scanned,
                            roundtrip=tmp_path / "back")
    peft_cfg = json.loads((GOLDEN / f"{kind}_fourierft" / "adapter_config.json").read_text())
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["scaling"], cfg["random_loc_seed"]) == (
        "FOURIERFT", peft_cfg["scaling"], peft_cfg["random_loc_seed"])
    # the frozen positions peftjax regenerated are PEFT's own (torch.randperm)
    ref = np.load(GOLDEN / "torch_outputs.npz")
    _, params, key_map, _ = tc.load(kind, scanned=scanned)
    seen = 0
    for upath, key in key_map.items():
        want = f"indices/{kind}/{key.module}"
        layer = int(upath.split("/")[1]) if upath.startswith("layers/") else 0
        path = upath.replace(f"layers/{layer}/", "layers/") if scanned else upath
        if want not in ref.files or path not in ad.assignment:  # biases share modules
            continue
        got = np.asarray(ad.state.frozen[path].indices)
        np.testing.assert_array_equal(got[layer] if scanned else got, ref[want], err_msg=upath)
        seen += 1
    assert seen == len([f for f in ref.files if f.startswith(f"indices/{kind}/")]) == \
        {"llama": 6, "bert": 10}[kind]
    n = {p: t.spectrum.shape[-1] for p, t in ad.state.trainable.items()}
    if kind == "llama":  # n_frequency=24, n_frequency_pattern={"down_proj": 40}
        assert sorted(set(n.values())) == [24, 40]
        assert tc.trainable_count(ad.state) == 176
    else:  # n_frequency=16, n_frequency_pattern={"intermediate.dense": 36}
        assert n["layers/0/intermediate/kernel"] == 36
        assert n["layers/0/output/kernel"] == n["layers/1/attention/query/kernel"] == 16
    if kind == "llama" and not scanned:  # positions PEFT cannot regenerate
        path = sorted(ad.assignment)[0]
        frozen = dict(ad.state.frozen)
        frozen[path] = adapters.FourierFTIndices(frozen[path].indices[..., ::-1])
        st = adapters.AdapterState(ad.state.trainable, frozen)
        with pytest.raises(ValueError, match="not PEFT's positions for random_loc_seed=11"):
            io.save_peft(tmp_path / "bad", ad.assignment, st, params, key_map=key_map)


def test_peftjax_written_fourierft_is_what_peft_verified(tmp_path):
    outputs = tc.check_peftjax_written(GOLDEN, "fourierft", tmp_path)
    base = np.load(GOLDEN / "torch_outputs.npz")
    for d, out in outputs.items():  # the written adapters move the outputs
        kind = d.split("_")[1]
        assert np.max(np.abs(tc._mask(kind, out) - tc._mask(kind, base[f"{kind}_base"]))) \
            > 100 * tc.TORCH_ATOL, d
    cfg = json.loads((tmp_path / "pj_llama_fourierft" / "adapter_config.json").read_text())
    assert (cfg["n_frequency"], cfg["scaling"], cfg["random_loc_seed"]) == (30, 12.5, 2024)
    assert sorted(set(cfg["n_frequency_pattern"].values())) == [12]


def test_fourierft_config_fields_not_honoured_are_refused(tmp_path):
    # fan_in_fan_out/bias only at PEFT's defaults; bad types and an
    # n_frequency (pattern) that disagrees with the file name the field
    tc.check_refused(GOLDEN, "fourierft", tmp_path, {
        "fan_in_fan_out": True, "bias": "all", "random_loc_seed": 1.5,
        "n_frequency": 0, "n_frequency_pattern": {}})
