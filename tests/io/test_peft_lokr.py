"""PEFT LoKr (``peft_type: LOKR``) both ways, against torch on the tiny Llama.

``tests/io/golden/peft_lokr/`` holds two PEFT-created LoKr adapters with every
``lokr_*`` tensor perturbed away from its init, torch's logits with each
(active and merged) and PEFT's trainable counts
(``scripts/golden/peft_lokr_make.py``), and peftjax-written adapters
(``scripts/golden/peft_lokr_from_peftjax.py``) that PEFT loaded, with the max
logit difference and the statistics of the tensors torch read in ``peft.json``.
"""

import importlib.util
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored, io, tree
from peftjax import models as pm
from peftjax.models import llama
from tests.helpers import assert_tensors_close, assert_verified_stats

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "io" / "golden" / "peft_lokr"
BASE = ROOT / "tests" / "io" / "golden" / "peft" / "llama_base"
TORCH_ATOL = 1e-4  # the bar, torch vs peftjax float32 logits
EXPORT_REL = 1e-6  # regenerated vs committed tensors (transposes of read values)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(GOLDEN / "torch_outputs.npz"))


@pytest.fixture(scope="module")
def peft_json():
    return json.loads((GOLDEN / "peft.json").read_text())


@pytest.mark.parametrize("name,scanned", [("llama_lokr", False),
                                          ("llama_lokr_factor", True)])
def test_peft_created_lokr_gives_torch_logits(name, scanned, ref, peft_json):
    model = llama.load_llama(BASE, scan_layers=scanned)
    g, params = pm.split_params(model)
    ad = io.load_peft(GOLDEN / name, params, key_map=llama.peft_key_map(model.config))
    ids = jnp.asarray(ref["inputs_llama"])

    def fwd(p, x):
        return pm.apply(g, p, x)

    mat = jax.jit(lambda t: fwd(adapters.materialize(ad.assignment, params, t,
                                                     ad.state.frozen), ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Kronecker factored form: no fallback
        fac = jax.jit(lambda t: factored.transform(
            fwd, ad.assignment, t, ad.state.frozen)(params, ids))(ad.state.trainable)
    for got in (mat(ad.state.trainable), fac):
        np.testing.assert_allclose(got, ref[name], rtol=0, atol=TORCH_ATOL)
    merged = adapters.fold(ad.assignment, params, *ad.state)
    np.testing.assert_allclose(fwd(merged, ids), ref[name + "_merged"], rtol=0,
                               atol=TORCH_ATOL)
    # the perturbed adapter moves the logits far beyond the bar
    assert np.max(np.abs(ref[name] - fwd(params, ids))) > 100 * TORCH_ATOL
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ad.state.trainable))
    assert n == peft_json["trainable_params"][name]
    q = "layers/self_attn/q_proj/kernel" if scanned else "layers/0/self_attn/q_proj/kernel"
    if name == "llama_lokr":  # r=4, alpha=8, decompose_both; down r=1; v alpha=6
        assert n == 152
        t = ad.state.trainable
        d, v = q.replace("self_attn/q_proj", "mlp/down_proj"), q.replace("q_proj", "v_proj")
        assert repr(ad.assignment[v]).startswith("lokr(rank=4, alpha=6,")
        assert repr(ad.assignment[d]).startswith("lokr(rank=1, alpha=8,")
        assert t[q].w1 is not None and t[q].w2 is not None  # q: both full
        assert t[d].w1 is None and t[d].w2 is None  # down: both decomposed
    else:  # decompose_factor=2: q (16 -> 2x8), w2 decomposed at r=2
        assert n == 176
        assert ad.state.trainable[q].w2_a.shape == (2, 2, 8)


def test_lokr_config_fields_not_honoured_are_refused(tmp_path):
    model = llama.load_llama(BASE, scan_layers=False)
    _, params = pm.split_params(model)
    km = llama.peft_key_map(model.config)
    cfg = json.loads((GOLDEN / "llama_lokr" / "adapter_config.json").read_text())
    for field, value in (("rank_dropout", 0.1), ("module_dropout", 0.2),
                         ("rank_dropout_scale", True), ("use_effective_conv2d", True),
                         ("decompose_factor", 0)):
        d = tmp_path / field
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
        (d / "adapter_model.safetensors").write_bytes(
            (GOLDEN / "llama_lokr" / "adapter_model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=f"{field}={value!r}"):
            io.load_peft(d, params, key_map=km)
    # a decompose_factor that splits the modules otherwise than the tensors do
    d = tmp_path / "factor"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "decompose_factor": 2}))
    (d / "adapter_model.safetensors").write_bytes(
        (GOLDEN / "llama_lokr" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="give shapes"):
        io.load_peft(d, params, key_map=km)


def test_peftjax_written_lokr_is_what_peft_verified(tmp_path, peft_json):
    spec = importlib.util.spec_from_file_location(
        "peft_lokr_from_peftjax", ROOT / "scripts" / "golden" / "peft_lokr_from_peftjax.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    outputs = mod.build(tmp_path)
    committed = GOLDEN / "from_peftjax"
    want = np.load(committed / "peftjax_outputs.npz")
    for name in ("pj_llama_lokr", "pj_llama_lokr_factor", "pj_native"):
        new, _ = io.read_safetensors(tmp_path / name / "adapter_model.safetensors")
        old, _ = io.read_safetensors(committed / name / "adapter_model.safetensors")
        assert_tensors_close(new, old, EXPORT_REL, name)
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert cfg == json.loads((committed / name / "adapter_config.json").read_text())
        rec = peft_json["from_peftjax"][name]
        assert rec["peft_type"] == "LOKR" and rec["passed"]
        assert_verified_stats(rec["tensor_stats"], old, name)
        drift = float(np.max(np.abs(outputs[name] - want[name])))
        assert drift + rec["max_abs_diff"] <= TORCH_ATOL
    # PEFT -> peftjax -> PEFT keeps PEFT's own tensors and config
    for name in ("llama_lokr", "llama_lokr_factor"):
        src, _ = io.read_safetensors(GOLDEN / name / "adapter_model.safetensors")
        back, _ = io.read_safetensors(tmp_path / f"pj_{name}" / "adapter_model.safetensors")
        assert_tensors_close(back, src, 0.0, name)
        a = json.loads((GOLDEN / name / "adapter_config.json").read_text())
        b = json.loads((tmp_path / f"pj_{name}" / "adapter_config.json").read_text())
        for field in ("r", "alpha", "decompose_both", "decompose_factor"):
            assert a[field] == b[field], field
        assert peft_json["from_peftjax"][f"pj_{name}"]["lokr_params"] == \
            peft_json["trainable_params"][name]
    # both factors full on k_proj: written at a rank that keeps them full
    cfg = json.loads((tmp_path / "pj_native" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 4
    assert cfg["alpha_pattern"]["model.layers.0.self_attn.k_proj"] == 2  # s = 4/8


def test_save_refuses_lokr_mixes_no_peft_config_builds(tmp_path):
    w = {"q": {"kernel": jnp.zeros((16, 16))}, "k": {"kernel": jnp.zeros((16, 16))}}
    km = {"q/kernel": io.PeftKey("q", "weight", io.TensorLayout.KERNEL),
          "k/kernel": io.PeftKey("k", "weight", io.TensorLayout.KERNEL)}
    a = tree.assign(w, [tree.Rule(where="q/kernel", then=adapters.lokr(1)),
                        tree.Rule(where="k/kernel", then=adapters.lokr(1, decompose_factor=2))])
    st = adapters.init(a, jax.random.key(0), w)
    with pytest.raises(ValueError, match="no single PEFT decompose_factor"):
        io.save_peft(tmp_path, a, st, w, key_map=km)
