"""FourierFT against Hugging Face PEFT on the tiny Llama golden.

``tests/io/golden/peft_fourierft/`` holds a PEFT-created FourierFT adapter
(``n_frequency_pattern``, non-default ``scaling`` and ``random_loc_seed``,
every spectrum perturbed), PEFT's frequency positions, the torch logits and
PEFT's trainable count (``scripts/golden/peft_fourierft_make.py``).
"""

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
