"""PEFT LoHa (``peft_type: LOHA``) both ways, against torch on the tiny Llama.

``tests/io/golden/peft_loha/`` holds a PEFT-created LoHa adapter with every
``hada_*`` tensor perturbed away from its init, torch's logits with it (active
and merged) and PEFT's trainable-parameter count
(``scripts/golden/peft_loha_make.py``), plus a peftjax-written adapter that
PEFT loaded (``scripts/golden/peft_loha_from_peftjax.py``, then the torch
script records the logit difference and tensor statistics in ``peft.json``).
"""

import importlib.util
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored, io
from peftjax import models as pm
from peftjax.models import llama
from tests.helpers import assert_tensors_close, assert_verified_stats

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "io" / "golden" / "peft_loha"
BASE = ROOT / "tests" / "io" / "golden" / "peft" / "llama_base"
TORCH_ATOL = 1e-4  # the bar, torch vs peftjax float32 logits
EXPORT_REL = 1e-5  # regenerated vs committed factors: NumPy-seeded copies


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(GOLDEN / "torch_outputs.npz"))


@pytest.fixture(scope="module")
def peft_json():
    return json.loads((GOLDEN / "peft.json").read_text())


@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned"])
def test_peft_created_loha_gives_torch_logits(scanned, ref, peft_json):
    model = llama.load_llama(BASE, scan_layers=scanned)
    g, params = pm.split_params(model)
    ad = io.load_peft(GOLDEN / "llama_loha", params, key_map=llama.peft_key_map(model.config))
    ids = jnp.asarray(ref["inputs_llama"])

    def fwd(p, x):
        return pm.apply(g, p, x)

    mat = jax.jit(lambda t: fwd(
        adapters.materialize(ad.assignment, params, t, ad.state.frozen), ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the factored path takes no fallback
        fac = jax.jit(lambda t: factored.transform(
            fwd, ad.assignment, t, ad.state.frozen)(params, ids))(ad.state.trainable)
    for got in (mat(ad.state.trainable), fac):
        np.testing.assert_allclose(got, ref["llama_loha"], rtol=0, atol=TORCH_ATOL)
    merged = adapters.fold(ad.assignment, params, *ad.state)
    np.testing.assert_allclose(fwd(merged, ids), ref["llama_loha_merged"], rtol=0,
                               atol=TORCH_ATOL)
    # the adapter moves the logits far beyond the bar (hada_w2_b is not 0)
    assert np.max(np.abs(ref["llama_loha"] - fwd(params, ids))) > 100 * TORCH_ATOL
    # PEFT's config: r=4, alpha=8, rank_pattern down_proj=2, alpha_pattern v_proj=6
    q = "layers/self_attn/q_proj/kernel" if scanned else "layers/0/self_attn/q_proj/kernel"
    d = q.replace("self_attn/q_proj", "mlp/down_proj")
    v = q.replace("q_proj", "v_proj")
    assert repr(ad.assignment[q]) == "loha(rank=4, alpha=8)"
    assert repr(ad.assignment[d]) == "loha(rank=2, alpha=8)"
    assert repr(ad.assignment[v]) == "loha(rank=4, alpha=6)"
    # the trainable-parameter count equals PEFT's for the same config
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ad.state.trainable))
    assert n == peft_json["trainable_params"] == 1280


def test_loha_config_fields_not_honoured_are_refused(tmp_path):
    model = llama.load_llama(BASE, scan_layers=False)
    _, params = pm.split_params(model)
    km = llama.peft_key_map(model.config)
    cfg = json.loads((GOLDEN / "llama_loha" / "adapter_config.json").read_text())
    for field, value in (("rank_dropout", 0.1), ("module_dropout", 0.2),
                         ("use_effective_conv2d", True)):
        d = tmp_path / field
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
        (d / "adapter_model.safetensors").write_bytes(
            (GOLDEN / "llama_loha" / "adapter_model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=f"{field}={value!r}"):
            io.load_peft(d, params, key_map=km)


def test_peftjax_written_loha_is_what_peft_verified(tmp_path, peft_json):
    spec = importlib.util.spec_from_file_location(
        "peft_loha_from_peftjax", ROOT / "scripts" / "golden" / "peft_loha_from_peftjax.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    outputs = mod.build(tmp_path)
    committed = GOLDEN / "from_peftjax"
    new, _ = io.read_safetensors(tmp_path / "pj_loha" / "adapter_model.safetensors")
    old, _ = io.read_safetensors(committed / "pj_loha" / "adapter_model.safetensors")
    assert_tensors_close(new, old, EXPORT_REL, "pj_loha")
    assert json.loads((tmp_path / "pj_loha" / "adapter_config.json").read_text()) == \
        json.loads((committed / "pj_loha" / "adapter_config.json").read_text())
    rec = peft_json["pj_loha"]
    assert rec["peft_type"] == "LOHA" and rec["max_abs_diff"] <= TORCH_ATOL
    assert_verified_stats(rec["tensor_stats"], old, "pj_loha")
    drift = float(np.max(np.abs(outputs["pj_loha"] -
                                np.load(committed / "peftjax_outputs.npz")["pj_loha"])))
    assert drift + rec["max_abs_diff"] <= TORCH_ATOL
    # and it reads back into the same adapter (exact: a transpose each way)
    model = llama.load_llama(BASE, scan_layers=True)
    _, params = pm.split_params(model)
    back = io.load_peft(tmp_path / "pj_loha", params, key_map=llama.peft_key_map(model.config))
    assert repr(back.assignment["layers/mlp/up_proj/kernel"]) == "loha(rank=2, alpha=3)"
    assert back.state.trainable["layers/self_attn/q_proj/kernel"].a2.shape == (2, 16, 4)
