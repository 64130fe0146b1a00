"""LN tuning against Hugging Face PEFT on the tiny Llama golden.

``tests/io/golden/peft_ln_tuning/`` holds a PEFT-created LN-tuning adapter on
every RMSNorm with each trainable norm copy perturbed away from its init, the
torch logits and PEFT's trainable count (``scripts/golden/peft_ln_tuning_make.py``).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import llama

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
