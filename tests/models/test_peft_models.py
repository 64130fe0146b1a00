"""PEFT adapters against torch: tiny random Llama and BERT goldens.

``tests/io/golden/peft/`` holds PEFT-created adapters (non-zero B) and the
torch outputs (``scripts/golden/peft_make.py``), peftjax-written adapters
that PEFT loaded and checked (``scripts/golden/peft_from_peftjax.py`` then
``scripts/golden/peft_verify.py`` -> ``verified.json``, with summary
statistics of every tensor it loaded). Regenerated tensors are compared with
the committed ones within a stated bound, never by bytes: the merged tensors
are computed, and XLA's kernels differ between CPUs. Conversion: torch
``lora_A (r, in)`` = Flax ``a.T``, ``lora_B (out, r)`` = ``b.T``.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import bert, llama
from tests.helpers import assert_tensors_close, assert_verified_stats

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "io" / "golden" / "peft"
# The bar for torch vs peftjax outputs (float32, different kernels).
TORCH_ATOL = 1e-4
# Regenerated adapters vs the committed ones: |new - old| <= EXPORT_REL ·
# max|old| per tensor. They are NumPy-seeded copies, ``head + noise`` and one
# rank-4 LoRA merge W + s·AB: a float32 rank-K product is within
# (K + 1)·2^-24·(|W| + s|A||B|) of the exact value on any correct kernel, and
# the committed merges are within 1.2e-7·max|W'| of a float64 merge, so two
# CPUs agree to ~1e-6·max|W'|; 1e-5 leaves a 10x margin.
EXPORT_REL = 1e-5
LLAMA = ["llama_lora", "llama_dora_rslora", "llama_embed", "llama_ia3", "llama_vera"]


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(GOLDEN / "torch_outputs.npz"))


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def tiny_llama(request):
    model = llama.load_llama(GOLDEN / "llama_base", scan_layers=request.param)
    g, params = pm.split_params(model)
    # one compile per layout: every adapter gives a tree of the same structure
    fwd = jax.jit(lambda p, ids: pm.apply(g, p, ids))
    return fwd, params, llama.peft_key_map(model.config)


def test_base_matches_torch(tiny_llama, ref):
    fwd, params, _ = tiny_llama
    out = fwd(params, jnp.asarray(ref["inputs_llama"]))
    np.testing.assert_allclose(out, ref["llama_base"], rtol=0, atol=TORCH_ATOL)


@pytest.mark.parametrize("name", LLAMA)
def test_peft_created_llama_adapters(tiny_llama, ref, name):
    fwd, params, km = tiny_llama
    ad = io.load_peft(GOLDEN / name, params, key_map=km)
    ids = jnp.asarray(ref["inputs_llama"])
    p = tree.replace_leaves(adapters.materialize(ad.assignment, params, *ad.state),
                            ad.full)
    np.testing.assert_allclose(fwd(p, ids), ref[name], rtol=0, atol=TORCH_ATOL)
    merged = tree.replace_leaves(adapters.fold(ad.assignment, params, *ad.state),
                                 ad.full)
    np.testing.assert_allclose(fwd(merged, ids), ref[name + "_merged"],
                               rtol=0, atol=TORCH_ATOL)
    # the adapter changes the output well beyond the bar (non-zero B)
    assert np.max(np.abs(ref[name] - ref["llama_base"])) > 100 * TORCH_ATOL
    if name == "llama_lora":
        assert sorted(ad.full) == ["lm_head/kernel"]


def test_peft_created_bert_adapter(ref):
    enc = bert.load_bert(GOLDEN / "bert_base")
    g, params = pm.split_params(enc)
    ad = io.load_peft(GOLDEN / "bert_lora", params,
                      key_map=bert.peft_key_map(enc.config))
    assert len(ad.assignment) == 10  # query, value, 3 dense per layer
    p = adapters.materialize(ad.assignment, params, *ad.state)
    out = pm.apply(g, p, jnp.asarray(ref["inputs_bert"]),
                   attention_mask=jnp.asarray(ref["mask_bert"]))
    m = ref["mask_bert"].astype(bool)  # padded positions are not compared
    np.testing.assert_allclose(np.asarray(out)[m], ref["bert_lora"][m], rtol=0,
                               atol=TORCH_ATOL)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    spec = importlib.util.spec_from_file_location(
        "peft_from_peftjax", ROOT / "scripts" / "golden" / "peft_from_peftjax.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("pj")
    return out, mod.build(out)


def test_peftjax_written_adapters_are_the_verified_tensors(regenerated):
    out, outputs = regenerated
    verified = json.loads((GOLDEN / "verified.json").read_text())
    committed = GOLDEN / "from_peftjax"
    names = sorted(p.name for p in committed.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        fn = "model.safetensors" if name.endswith("_merged") else "adapter_model.safetensors"
        new, _ = io.read_safetensors(out / name / fn)
        old, _ = io.read_safetensors(committed / name / fn)
        assert_tensors_close(new, old, EXPORT_REL, name)
        cfg = "config.json" if name.endswith("_merged") else "adapter_config.json"
        assert json.loads((out / name / cfg).read_text()) == json.loads(
            (committed / name / cfg).read_text())
        # torch verified the committed tensors, within the bar
        assert_verified_stats(verified[name]["tensor_stats"], old, name)
        assert verified[name]["max_abs_diff"] <= TORCH_ATOL
    ref = np.load(GOLDEN / "peftjax_outputs.npz")
    assert sorted(outputs) == names
    for name, value in outputs.items():
        # |new - torch| <= |new - committed peftjax| + the verified max-abs-diff
        drift = float(np.max(np.abs(value - ref[name])))
        assert drift + verified[name]["max_abs_diff"] <= TORCH_ATOL, (name, drift)


def test_merged_export_reloads_with_identical_logits(regenerated, ref):
    out, outputs = regenerated
    model = llama.load_llama(out / "pj_lora_merged", scan_layers=True)
    g, params = pm.split_params(model)
    # the same jitted forward as peft_from_peftjax.build, so bit-identical
    fwd = jax.jit(lambda p, x: pm.apply(g, p, x))
    got = np.asarray(fwd(params, jnp.asarray(ref["inputs_llama"])))
    np.testing.assert_array_equal(got, outputs["pj_lora_merged"])
