"""PEFT aLoRA (LoRA with ``alora_invocation_tokens``) both ways, against torch.

Goldens: ``scripts/golden/peft_alora_make.py`` (torch side: logits of inputs
holding the invocation sequence at different slots per row, and PEFT's greedy
KV-cache generation) and ``scripts/golden/peft_alora_from_peftjax.py``. The
files are plain LoRA; the update goes through ``adapters.alora_hook``.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io
from peftjax import models as pm
from peftjax.models import llama
from tests.io import tuner_checks as tc

# every aLoRA file read warns that the hook, not materialize, applies it
pytestmark = pytest.mark.filterwarnings("ignore:load_peft. .* is an aLoRA:UserWarning")
GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_alora"
INVOCATION = [7, 50]


def _hook(ad, ids):
    inv = ad.config["alora_invocation_tokens"]
    return adapters.alora_hook(ad.assignment, ad.state.trainable,
                               adapters.alora_starts(ids, inv), num_layers=2)


@pytest.mark.parametrize("scanned", [False, True])
def test_peft_made_alora_gives_torch_logits(scanned, tmp_path):
    ref = np.load(GOLDEN / "torch_outputs.npz")
    g, params, key_map, _ = tc.load("llama", scanned=scanned)
    with pytest.warns(UserWarning, match="is an aLoRA .* materialize or fold would apply"):
        ad = io.load_peft(GOLDEN / "llama_alora", params, key_map=key_map)
    assert ad.config["alora_invocation_tokens"] == INVOCATION
    ids = jnp.asarray(ref["inputs"])
    starts = adapters.alora_starts(ids, INVOCATION)
    assert starts.tolist() == [6, 1, adapters._alora.NEVER]  # last occurrence; none
    # one pass over prompt + PEFT's greedy continuation (the prompt's starts):
    # the prompt's logits are PEFT's, and each continuation token is the argmax
    # of the full pass (KV-cache generation = full passes)
    full, t = jnp.concatenate([ids, ref["generated"]], axis=1), ids.shape[1]
    got = np.asarray(jax.jit(lambda tr: pm.apply(g, params, full, hooks=adapters.alora_hook(
        ad.assignment, tr, starts, num_layers=2)))(ad.state.trainable))
    np.testing.assert_allclose(got[:, :t], ref["llama_alora"], rtol=0, atol=tc.TORCH_ATOL)
    np.testing.assert_array_equal(np.argmax(got[:, t - 1:-1], -1), ref["generated"])
    moved = np.abs(ref["llama_alora"] - ref["llama_base"]).max(-1)
    assert (moved[0, :6] < 1e-5).all() and (moved[0, 6:] > 1e-2).all()
    assert (moved[2] < 1e-5).all()  # no invocation: the base model
    assert tc.trainable_count(ad.state) == json.loads(
        (GOLDEN / "peft.json").read_text())["trainable_params"]["llama"]
    if scanned:  # PEFT's greedy generate with its KV cache, token for token
        out = llama.generate(pm.rebuild(g, params), ids, max_new_tokens=5,
                             hooks=_hook(ad, ids))
        np.testing.assert_array_equal(np.asarray(out), ref["generated"])
        return
    # PEFT -> peftjax -> PEFT keeps the tensors and the invocation tokens
    io.save_peft(tmp_path, ad.assignment, ad.state, params, key_map=key_map,
                 alora_invocation_tokens=INVOCATION)
    back = io.load_peft(tmp_path, params, key_map=key_map)
    assert back.config["alora_invocation_tokens"] == INVOCATION
    jax.tree.map(np.testing.assert_array_equal, back.state, ad.state)


def test_alora_config_errors(tmp_path):
    _, params, key_map, _ = tc.load("llama")
    src = GOLDEN / "llama_alora"
    cfg = json.loads((src / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({**cfg, "alora_invocation_tokens": [1.5]}))
    (tmp_path / "adapter_model.safetensors").write_bytes(
        (src / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="alora_invocation_tokens"):
        io.load_peft(tmp_path, params, key_map=key_map)
    ad = io.load_peft(src, params, key_map=key_map)
    with pytest.raises(ValueError, match="alora_invocation_tokens"):
        io.save_peft(tmp_path / "x", ad.assignment, ad.state, params, key_map=key_map,
                     alora_invocation_tokens=[])


def test_peftjax_written_alora_loads_in_peft_with_peftjax_logits(tmp_path):
    out = tc.check_peftjax_written(GOLDEN, "alora", tmp_path, read_back=False)
    g, params, key_map, _ = tc.load("llama", scanned=True)
    back = io.load_peft(tmp_path / "pj_llama_alora", params, key_map=key_map)
    script = tc._script("peft_alora_from_peftjax.py")
    got = script.logits(g, params, back.assignment, back.state.trainable)
    np.testing.assert_allclose(got, out["pj_llama_alora"], rtol=0, atol=1e-5)
