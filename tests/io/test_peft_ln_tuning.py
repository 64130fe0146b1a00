"""LN tuning against Hugging Face PEFT on the tiny Llama golden.

``tests/io/golden/peft_ln_tuning/`` holds a PEFT-created LN-tuning adapter on
every RMSNorm with each trainable norm copy perturbed away from its init, the
torch logits and PEFT's trainable count (``scripts/golden/peft_ln_tuning_make.py``),
and peftjax-written files (``scripts/golden/peft_ln_tuning_from_peftjax.py``)
with the max logit difference PEFT measured loading them (``peft.json``).
"""

import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import llama
from tests import helpers as h

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "io" / "golden" / "peft_ln_tuning"
BASE = ROOT / "tests" / "io" / "golden" / "peft" / "llama_base"
# The bar for torch vs peftjax logits (float32, different kernels).
TORCH_ATOL = 1e-4
NORMS = r"(layers/(\d+/)?(input_layernorm|post_attention_layernorm)|norm)/scale"


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(GOLDEN / "torch_outputs.npz"))


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def tiny_llama(request):
    model = llama.load_llama(BASE, scan_layers=request.param)
    g, params = pm.split_params(model)
    fwd = jax.jit(lambda p, ids: pm.apply(g, p, ids))
    return fwd, params, llama.peft_key_map(model.config), request.param


def _by_hand(params, km, scanned):
    """The PEFT tensors put into an ``ln_tuning`` state without peftjax.io."""
    tensors, _ = io.read_safetensors(GOLDEN / "llama_ln_tuning" / "adapter_model.safetensors")
    a = tree.assign(params, [tree.Rule(where=NORMS, then=adapters.ln_tuning())])
    state = adapters.init(a, jax.random.key(0), params)
    vals = {}
    for path, key in km.items():
        name = f"base_model.model.{key.module}.ln_tuning_layers.{key.tensor}"
        if name in tensors:
            vals[path] = np.asarray(tensors.pop(name))
    assert not tensors, sorted(tensors)
    if scanned:
        vals = {p: np.stack([vals[p.replace("layers/", f"layers/{i}/")] for i in range(2)])
                if p.startswith("layers/") else vals[p] for p in state.trainable}
    trainable = {p: adapters.LNTuningParams(jnp.asarray(vals[p])) for p in state.trainable}
    return a, adapters.AdapterState(trainable, state.frozen)


def test_peft_made_ln_tuning_logits_and_count(tiny_llama, ref):
    fwd, params, km, scanned = tiny_llama
    a, state = _by_hand(params, km, scanned)
    ids = jnp.asarray(ref["inputs_llama"])
    np.testing.assert_allclose(fwd(adapters.materialize(a, params, *state), ids),
                               ref["llama_ln_tuning"], rtol=0, atol=TORCH_ATOL)
    merged, aux = adapters.fold(a, params, *state, return_aux=True)
    np.testing.assert_allclose(fwd(merged, ids), ref["llama_ln_tuning_merged"],
                               rtol=0, atol=TORCH_ATOL)
    back = adapters.unfold(a, merged, *state, aux=aux)
    np.testing.assert_allclose(fwd(back, ids), ref["llama_base"], rtol=0, atol=TORCH_ATOL)
    # the perturbed norms move the logits well beyond the bar
    assert np.abs(ref["llama_ln_tuning"] - ref["llama_base"]).max() > 100 * TORCH_ATOL
    peft = json.loads((GOLDEN / "peft.json").read_text())
    assert adapters.num_trainable(state.trainable) == peft["trainable_params"] == 80


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    fwd, params, km, scanned = tiny_llama
    return io.load_peft(GOLDEN / "llama_ln_tuning", params, key_map=km)


def test_load_peft_reads_peft_made_file(tiny_llama, loaded, ref):
    fwd, params, km, scanned = tiny_llama
    want_a, want = _by_hand(params, km, scanned)
    assert sorted(loaded.assignment) == sorted(want_a) and loaded.full == {}
    h.assert_tree_allclose(loaded.state.trainable, want.trainable, **h.EXACT)
    ids = jnp.asarray(ref["inputs_llama"])
    out = fwd(adapters.materialize(loaded.assignment, params, *loaded.state), ids)
    np.testing.assert_allclose(out, ref["llama_ln_tuning"], rtol=0, atol=TORCH_ATOL)
    assert adapters.num_trainable(loaded.state.trainable) == 80


def test_save_load_roundtrip_exact(tiny_llama, loaded, tmp_path):
    fwd, params, km, scanned = tiny_llama
    d = io.save_peft(tmp_path / "ad", loaded.assignment, loaded.state, params,
                     key_map=km)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LN_TUNING" and len(cfg["target_modules"]) == 5
    back = io.load_peft(d, params, key_map=km)
    h.assert_tree_allclose(back.state.trainable, loaded.state.trainable, **h.EXACT)
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    peft_t, _ = io.read_safetensors(GOLDEN / "llama_ln_tuning" / "adapter_model.safetensors")
    assert sorted(t) == sorted(peft_t)  # PEFT's key names, both layouts


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    spec = importlib.util.spec_from_file_location(
        "peft_ln_tuning_from_peftjax",
        ROOT / "scripts" / "golden" / "peft_ln_tuning_from_peftjax.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("pj_ln")
    return out, mod.build(out)


def test_peftjax_written_files_load_in_peft(regenerated):
    out, logits = regenerated
    committed = GOLDEN / "from_peftjax"
    old = np.load(committed / "peftjax_outputs.npz")
    peft = json.loads((GOLDEN / "peft.json").read_text())
    base = np.load(GOLDEN / "torch_outputs.npz")["llama_base"]
    for name in ("pj_ln_tuning_unrolled", "pj_ln_tuning_scanned"):
        new_t, _ = io.read_safetensors(out / name / "adapter_model.safetensors")
        old_t, _ = io.read_safetensors(committed / name / "adapter_model.safetensors")
        assert sorted(new_t) == sorted(old_t)
        for k in new_t:  # base norm + NumPy noise, one float32 addition
            np.testing.assert_allclose(new_t[k], old_t[k], rtol=1e-6, atol=0, err_msg=k)
        assert (json.loads((out / name / "adapter_config.json").read_text())
                == json.loads((committed / name / "adapter_config.json").read_text()))
        # a different CPU's XLA kernels: well inside the torch bar
        np.testing.assert_allclose(logits[name], old[name], rtol=0, atol=1e-5)
        rec = peft[name]
        assert rec["passed"] and rec["peft_type"] == "LN_TUNING"
        assert rec["max_abs_diff"] <= TORCH_ATOL
        assert np.abs(old[name] - base).max() > 100 * TORCH_ATOL  # not the base


def _edit(src, dst, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t, _ = io.read_safetensors(src / "adapter_model.safetensors")
    io.write_safetensors(dst / "adapter_model.safetensors", tensors(t) if tensors else t)
    return dst


@pytest.mark.parametrize("config,tensors,match", [
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"fan_in_fan_out": True}, None, "fan_in_fan_out=True"),
    ({"target_modules": ["input_layernorm", "q_proj"]}, None,
     "selects 'model.layers.0.self_attn.q_proj'"),
    ({"exclude_modules": ["norm"]}, None, "not LN-tuning copies"),
    ({"target_modules": None}, None, "no target_modules"),
    (None, lambda t: {k: v for k, v in t.items() if "model.norm" not in k},
     "lacks"),
    (None, lambda t: {k: v[:8] for k, v in t.items()}, "has shape"),
])
def test_config_fields_honoured_or_named(tiny_llama, tmp_path, config, tensors, match):
    fwd, params, km, scanned = tiny_llama
    d = _edit(GOLDEN / "llama_ln_tuning", tmp_path / "bad", config, tensors)
    with pytest.raises(ValueError, match=re.escape(match)):
        io.load_peft(d, params, key_map=km)
