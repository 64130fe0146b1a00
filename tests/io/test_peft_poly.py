"""PEFT Poly/MHR (``peft_type: POLY``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_poly_make.py`` (torch side, eval routing with
fixed task ids) and ``scripts/golden/peft_poly_from_peftjax.py`` (peftjax
side). Poly is a model hook, read and written by ``io.load_peft_poly`` /
``io.save_peft_poly`` (not a ``load_peft`` plug-in).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io
from peftjax import models as pm
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_poly"
TASK_IDS = {"llama": [2, 0], "bert": [1, 0]}


def _run(kind, params, g, pp):
    ids = jnp.asarray(tc._GOLDEN.LLAMA_IDS if kind == "llama" else tc._GOLDEN.BERT_IDS)
    kw = {} if kind == "llama" else {"attention_mask": (ids != 0).astype(jnp.int32)}

    @jax.jit
    def f(params, pp, t):
        return pm.apply(g, params, ids, hooks=adapters.PolyHook(pp, t), **kw)

    return np.asarray(f(params, pp, jnp.asarray(TASK_IDS[kind])))


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_poly_gives_torch_outputs(kind, scanned, tmp_path):
    g, params, key_map, _ = tc.load(kind, scanned=scanned)
    ref = np.load(GOLDEN / "torch_outputs.npz")
    pp, cfg = io.load_peft_poly(GOLDEN / f"{kind}_poly", key_map)
    got = _run(kind, params, g, pp)
    tc.assert_outputs_close(kind, got, ref[f"{kind}_poly"])
    assert np.abs(tc._mask(kind, ref[f"{kind}_poly"] - ref[f"{kind}_base"])).max() > 0.05
    counts = json.loads((GOLDEN / "peft.json").read_text())["trainable_params"]
    assert sum(x.size for x in jax.tree.leaves(pp)) == counts[kind]
    if kind == "llama" and not scanned:  # roundtrip: the same tensors and config
        io.save_peft_poly(tmp_path / "rt", pp, key_map)
        back, cfg2 = io.load_peft_poly(tmp_path / "rt", key_map)
        for x, y in zip(jax.tree.leaves(pp), jax.tree.leaves(back), strict=True):
            np.testing.assert_array_equal(x, y)
        for k in ("r", "n_tasks", "n_skills", "n_splits", "poly_type"):
            assert cfg2[k] == cfg[k]
        # a fresh init has PEFT's trainable count
        fresh = adapters.poly_init(jax.random.key(1), params, r=2, n_tasks=3,
                                   n_skills=3, n_splits=2,
                                   target_modules=["q_proj", "v_proj", "up_proj",
                                                   "down_proj"])
        assert sum(x.size for x in jax.tree.leaves(fresh)) == counts[kind]


def test_poly_files_refused(tmp_path):
    src = GOLDEN / "llama_poly"
    _, _, key_map, _ = tc.load("llama")
    for field, value, match in (("poly_type", "mhr", "poly_type"),
                                ("peft_type", "LORA", "peft_type"),
                                ("n_skills", 2, "disagree")):
        d = tmp_path / field
        d.mkdir()
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg[field] = value
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        (d / "adapter_model.safetensors").write_bytes(
            (src / "adapter_model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=match):
            io.load_peft_poly(d, key_map)
    # load_peft names the reader of a hook type
    _, params, key_map, _ = tc.load("llama")
    with pytest.raises(ValueError, match="POLY: read it with io.load_peft_poly"):
        io.load_peft(src, params, key_map=key_map)


def test_peftjax_written_poly_loads_in_peft_with_peftjax_outputs(tmp_path):
    report = json.loads((GOLDEN / "peft.json").read_text())
    mod = tc._script("peft_poly_from_peftjax.py")
    committed = np.load(GOLDEN / "from_peftjax" / "peftjax_outputs.npz")
    for kind in ("llama", "bert"):
        name = f"pj_{kind}_poly"
        assert report[name]["passed"] and report[name]["max_abs_diff"] <= tc.TORCH_ATOL
        # the committed outputs are peftjax's (PEFT matched them, above); the
        # files written now are the committed ones
        assert committed[name].shape[0] == 2
        mod.build(tmp_path, kind, tc.load, forward=False)
        want, _ = io.read_safetensors(GOLDEN / "from_peftjax" / name
                                      / "adapter_model.safetensors")
        got, _ = io.read_safetensors(tmp_path / name / "adapter_model.safetensors")
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        _, _, key_map, _ = tc.load(kind, scanned=kind == "llama")
        back, _ = io.load_peft_poly(tmp_path / name, key_map)  # reads back
        assert sum(x.size for x in jax.tree.leaves(back)) == report[
            "trainable_params"][kind]
