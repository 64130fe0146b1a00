"""FourierFT against Hugging Face PEFT on the tiny Llama golden.

``tests/io/golden/peft_fourierft/`` holds a PEFT-created FourierFT adapter
(``n_frequency_pattern``, non-default ``scaling`` and ``random_loc_seed``,
every spectrum perturbed), PEFT's frequency positions, the torch logits and
PEFT's trainable count (``scripts/golden/peft_fourierft_make.py``), and
peftjax-written files (``scripts/golden/peft_fourierft_from_peftjax.py``) with
the max logit difference PEFT measured loading them (``peft.json``).
"""

import importlib.util
import json
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored, io, tree
from peftjax import models as pm
from peftjax.models import llama
from tests import helpers as h

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "io" / "golden" / "peft_fourierft"
BASE = ROOT / "tests" / "io" / "golden" / "peft" / "llama_base"
# The bar for torch vs peftjax logits (float32, different kernels).
TORCH_ATOL = 1e-4
N = {"self_attn/q_proj": 24, "self_attn/v_proj": 24, "mlp/down_proj": 40}


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
    """The PEFT spectra put into a ``fourierft`` state without peftjax.io."""
    tensors, _ = io.read_safetensors(GOLDEN / "llama_fourierft" / "adapter_model.safetensors")
    pre = "layers/" if scanned else r"layers/\d+/"
    a = tree.assign(params, [
        tree.Rule(where=pre + m + "/kernel",
                  then=adapters.fourierft(n, scaling=20.0, random_loc_seed=11))
        for m, n in N.items()])
    state = adapters.init(a, jax.random.key(0), params)
    spec = {}
    for upath, key in km.items():
        name = f"base_model.model.{key.module}.fourierft_spectrum"
        if name in tensors:
            spec[upath] = np.asarray(tensors.pop(name))
    assert not tensors, sorted(tensors)
    trainable = {}
    for p in state.trainable:
        if scanned:
            v = np.stack([spec[p.replace("layers/", f"layers/{i}/")] for i in range(2)])
        else:
            v = spec[p]
        trainable[p] = adapters.FourierFTParams(jnp.asarray(v))
    return a, adapters.AdapterState(trainable, state.frozen)


def test_indices_are_peft_positions(tiny_llama, ref):
    fwd, params, km, scanned = tiny_llama
    a, state = _by_hand(params, km, scanned)
    for upath, key in km.items():
        rec = ref.get("indices/" + key.module)
        if rec is None:
            continue
        path = upath if not scanned else "layers/" + upath.split("/", 2)[2]
        got = np.asarray(state.frozen[path].indices)
        got = got[int(upath.split("/")[1])] if scanned else got
        np.testing.assert_array_equal(got, rec.astype(np.int32), err_msg=upath)


def test_peft_made_fourierft_logits_and_count(tiny_llama, ref):
    fwd, params, km, scanned = tiny_llama
    a, state = _by_hand(params, km, scanned)
    ids = jnp.asarray(ref["inputs_llama"])
    np.testing.assert_allclose(fwd(adapters.materialize(a, params, *state), ids),
                               ref["llama_fourierft"], rtol=0, atol=TORCH_ATOL)
    np.testing.assert_allclose(fwd(adapters.fold(a, params, *state), ids),
                               ref["llama_fourierft_merged"], rtol=0, atol=TORCH_ATOL)
    assert np.abs(ref["llama_fourierft"] - ref["llama_base"]).max() > 100 * TORCH_ATOL
    peft = json.loads((GOLDEN / "peft.json").read_text())
    assert adapters.num_trainable(state.trainable) == peft["trainable_params"] == 176


def test_factored_path_matches_peft_without_fallback(tiny_llama, ref):
    fwd, params, km, scanned = tiny_llama
    a, state = _by_hand(params, km, scanned)
    g = pm.split_params(llama.load_llama(BASE, scan_layers=scanned))[0]
    run = factored.transform(lambda p, ids: pm.apply(g, p, ids), a, state.trainable,
                             state.frozen, deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", factored.FactoredFallbackWarning)
        out = jax.jit(run)(params, jnp.asarray(ref["inputs_llama"]))
    np.testing.assert_allclose(out, ref["llama_fourierft"], rtol=0, atol=TORCH_ATOL)


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    fwd, params, km, scanned = tiny_llama
    return io.load_peft(GOLDEN / "llama_fourierft", params, key_map=km)


def test_load_peft_reads_peft_made_file(tiny_llama, loaded, ref):
    fwd, params, km, scanned = tiny_llama
    want_a, want = _by_hand(params, km, scanned)
    assert sorted(loaded.assignment) == sorted(want_a)
    h.assert_tree_allclose(loaded.state.trainable, want.trainable, **h.EXACT)
    h.assert_tree_allclose(loaded.state.frozen, want.frozen, **h.EXACT)
    ids = jnp.asarray(ref["inputs_llama"])
    out = fwd(adapters.materialize(loaded.assignment, params, *loaded.state), ids)
    np.testing.assert_allclose(out, ref["llama_fourierft"], rtol=0, atol=TORCH_ATOL)
    assert adapters.num_trainable(loaded.state.trainable) == 176


def test_save_load_roundtrip_exact(tiny_llama, loaded, tmp_path):
    fwd, params, km, scanned = tiny_llama
    d = io.save_peft(tmp_path / "ad", loaded.assignment, loaded.state, params,
                     key_map=km)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["scaling"], cfg["random_loc_seed"]) == (
        "FOURIERFT", 20.0, 11)
    back = io.load_peft(d, params, key_map=km)
    h.assert_tree_allclose(back.state.trainable, loaded.state.trainable, **h.EXACT)
    h.assert_tree_allclose(back.state.frozen, loaded.state.frozen, **h.EXACT)


def test_save_refuses_positions_peft_cannot_regenerate(tiny_llama, loaded, tmp_path):
    fwd, params, km, scanned = tiny_llama
    path = sorted(loaded.assignment)[0]
    frozen = dict(loaded.state.frozen)
    frozen[path] = adapters.FourierFTIndices(frozen[path].indices[..., ::-1])
    st = adapters.AdapterState(loaded.state.trainable, frozen)
    with pytest.raises(ValueError, match="not PEFT's positions for random_loc_seed=11"):
        io.save_peft(tmp_path / "bad", loaded.assignment, st, params, key_map=km)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    spec = importlib.util.spec_from_file_location(
        "peft_fourierft_from_peftjax",
        ROOT / "scripts" / "golden" / "peft_fourierft_from_peftjax.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("pj_fft")
    return out, mod.build(out)


def test_peftjax_written_files_load_in_peft(regenerated):
    out, logits = regenerated
    committed = GOLDEN / "from_peftjax"
    old = np.load(committed / "peftjax_outputs.npz")
    peft = json.loads((GOLDEN / "peft.json").read_text())
    base = np.load(GOLDEN / "torch_outputs.npz")["llama_base"]
    for name in ("pj_fourierft_unrolled", "pj_fourierft_scanned"):
        new_t, _ = io.read_safetensors(out / name / "adapter_model.safetensors")
        old_t, _ = io.read_safetensors(committed / name / "adapter_model.safetensors")
        assert sorted(new_t) == sorted(old_t)
        for k in new_t:  # NumPy draws cast to float32: no arithmetic
            np.testing.assert_array_equal(new_t[k], old_t[k], err_msg=k)
        assert (json.loads((out / name / "adapter_config.json").read_text())
                == json.loads((committed / name / "adapter_config.json").read_text()))
        np.testing.assert_allclose(logits[name], old[name], rtol=0, atol=1e-5)
        rec = peft[name]
        assert rec["passed"] and rec["peft_type"] == "FOURIERFT"
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


@pytest.mark.parametrize("config,match", [
    ({"n_frequency_pattern": {}}, "n_frequency=24 in"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
    ({"bias": "all"}, "bias='all'"),
    ({"random_loc_seed": 1.5}, "random_loc_seed=1.5 (must be an int)"),
    ({"n_frequency": 0}, "n_frequency=0 (must be a positive int)"),
    ({"target_modules": ["q_proj"]}, "does not select"),
])
def test_config_fields_honoured_or_named(tiny_llama, tmp_path, config, match):
    fwd, params, km, scanned = tiny_llama
    d = _edit(GOLDEN / "llama_fourierft", tmp_path / "bad", config)
    with pytest.raises(ValueError, match=re.escape(match)):
        io.load_peft(d, params, key_map=km)
