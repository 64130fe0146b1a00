"""PEFT X-LoRA (``peft_type: XLORA``) both ways, against torch on the tiny Llama.

Goldens: ``scripts/golden/peft_xlora_make.py`` (torch side: three perturbed
LoRA experts, a deep layerwise top-k classifier and a flat softmax-top-k one)
and ``scripts/golden/peft_xlora_from_peftjax.py`` (peftjax side). X-LoRA is
read and written by ``io.load_peft_xlora`` / ``io.save_peft_xlora``.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_xlora"


@pytest.mark.parametrize("name", ["deep", "flat"])
def test_peft_made_xlora_gives_torch_logits_and_scalings(name, tmp_path):
    g, params, key_map, _ = tc.load("llama", scanned=True)
    ref = np.load(GOLDEN / "torch_outputs.npz")
    clf, ex, cfg = io.load_peft_xlora(GOLDEN / f"llama_xlora_{name}", key_map)
    f = jax.jit(lambda p, c, e: adapters.xlora_forward(g, p, jnp.asarray(
        tc._GOLDEN.LLAMA_IDS), c, e, cfg))
    logits, s = f(params, clf, ex)
    tc.assert_outputs_close("llama", logits, ref[f"llama_xlora_{name}"])
    np.testing.assert_allclose(s, ref[f"llama_xlora_{name}_scalings"], atol=1e-5)
    assert np.abs(ref[f"llama_xlora_{name}"] - ref["llama_base"]).max() > 0.5
    report = json.loads((GOLDEN / "peft.json").read_text())
    assert sum(x.size for x in jax.tree.leaves(clf)) == report["trainable_params"][name]
    assert report["peft_reload_max_abs_diff"][name] == 0.0
    if name == "deep":  # roundtrip (experts padded to the largest rank)
        io.save_peft_xlora(tmp_path / "rt", clf, ex, cfg, key_map)
        c2, e2, cfg2 = io.load_peft_xlora(tmp_path / "rt", key_map)
        assert cfg2 == cfg
        for x, y in zip(jax.tree.leaves((clf, ex)), jax.tree.leaves((c2, e2)),
                        strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_xlora_files_refused(tmp_path):
    _, _, key_map, _ = tc.load("llama")
    src = GOLDEN / "llama_xlora_flat"
    for field, value, where, match in (
            ("use_trainable_adapters", True, "", "use_trainable_adapters"),
            ("xlora_depth", 2, "", "xlora_depth=2"),
            ("use_dora", True, "0", "use_dora"),
            ("peft_type", "LOHA", "0", "expected 'LORA'")):
        d = tmp_path / field
        shutil.copytree(src, d)
        p = d / where / "adapter_config.json"
        cfg = json.loads(p.read_text())
        cfg[field] = value
        p.write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=match):
            io.load_peft_xlora(d, key_map)


def test_peftjax_written_xlora_loads_in_peft_with_peftjax_outputs(tmp_path):
    report = json.loads((GOLDEN / "peft.json").read_text())
    mod = tc._script("peft_xlora_from_peftjax.py")
    committed = np.load(GOLDEN / "from_peftjax" / "peftjax_outputs.npz")
    name = "pj_llama_xlora_deep"
    for n in ("pj_llama_xlora_deep", "pj_llama_xlora_flat"):
        assert report[n]["passed"] and report[n]["max_abs_diff"] <= tc.TORCH_ATOL
    out = mod.build(tmp_path, "deep", tc.load)
    np.testing.assert_allclose(out, committed[name], atol=1e-5)
    for sub in ("", "0", "1", "2"):
        want, _ = io.read_safetensors(GOLDEN / "from_peftjax" / name / sub
                                      / "adapter_model.safetensors")
        got, _ = io.read_safetensors(tmp_path / name / sub / "adapter_model.safetensors")
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    stats = report[name]["tensor_stats"]
    assert sorted(stats) == sorted(io.read_safetensors(
        tmp_path / name / "adapter_model.safetensors")[0])
