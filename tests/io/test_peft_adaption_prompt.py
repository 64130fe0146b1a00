"""PEFT adaption prompts (``peft_type: ADAPTION_PROMPT``) both ways, against torch.

Goldens: ``scripts/golden/peft_adaption_prompt_make.py`` (torch side: logits
and PEFT's greedy KV-cache generation with the top layer adapted, non-zero
gate) and ``scripts/golden/peft_adaption_prompt_from_peftjax.py`` (both
layers). The update goes through ``adapters.AdaptionPromptHook``.
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

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_adaption_prompt"
NAME = "llama_adaption_prompt"


@pytest.mark.parametrize("scanned", [False, True])
def test_peft_made_adaption_prompt_gives_torch_logits(scanned, tmp_path):
    ref = np.load(GOLDEN / "torch_outputs.npz")
    g, params, _, _ = tc.load("llama", scanned=scanned)
    p, cfg = io.load_peft_adaption_prompt(GOLDEN / NAME, num_layers=2, hidden_size=16)
    assert (cfg["adapter_layers"], cfg["adapter_len"]) == (1, 3)
    ids = jnp.asarray(ref["inputs"])
    # one pass over prompt + PEFT's greedy continuation: the prompt's logits
    # are PEFT's, and each continuation token is the argmax of the full pass
    full, t = jnp.concatenate([ids, ref["generated"]], axis=1), ids.shape[1]
    got = np.asarray(jax.jit(lambda q: pm.apply(g, params, full, hooks=(
        adapters.AdaptionPromptHook(q, num_layers=2))))(p))
    np.testing.assert_allclose(got[:, :t], ref[NAME], rtol=0, atol=tc.TORCH_ATOL)
    np.testing.assert_array_equal(np.argmax(got[:, t - 1:-1], -1), ref["generated"])
    assert np.abs(ref[NAME] - ref["llama_base"]).max() > 100 * tc.TORCH_ATOL
    assert sum(x.size for x in jax.tree.leaves(p)) == json.loads(
        (GOLDEN / "peft.json").read_text())["trainable_params"]["llama"]
    if scanned:  # PEFT's greedy generate with its KV cache, token for token
        hook = adapters.AdaptionPromptHook(p, num_layers=2)
        out = llama.generate(pm.rebuild(g, params), ids, max_new_tokens=5, hooks=hook)
        np.testing.assert_array_equal(np.asarray(out), ref["generated"])
        return
    # PEFT -> peftjax -> PEFT keeps PEFT's tensors bit for bit
    io.save_peft_adaption_prompt(tmp_path, p, num_layers=2)
    tc.assert_tensors_close(io.read_safetensors(tmp_path / "adapter_model.safetensors")[0],
                            io.read_safetensors(GOLDEN / NAME / "adapter_model.safetensors")[0],
                            0.0, NAME)


def test_adaption_prompt_files_refused(tmp_path):
    src = GOLDEN / NAME
    cfg = json.loads((src / "adapter_config.json").read_text())
    weights = (src / "adapter_model.safetensors").read_bytes()
    for i, (change, match) in enumerate([({"adapter_len": 4}, "shape"),
                                         ({"adapter_layers": 2}, "missing"),
                                         ({"adapter_layers": 3}, "adapter_layers=3"),
                                         ({"bogus": 1}, "bogus")]):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        (d / "adapter_model.safetensors").write_bytes(weights)
        with pytest.raises(ValueError, match=match):
            io.load_peft_adaption_prompt(d, num_layers=2, hidden_size=16)
    _, params, key_map, _ = tc.load("llama")
    with pytest.raises(ValueError, match="load_peft_adaption_prompt"):
        io.load_peft(src, params, key_map=key_map)


def test_peftjax_written_adaption_prompt_loads_in_peft_with_peftjax_logits(tmp_path):
    out = tc.check_peftjax_written(GOLDEN, "adaption_prompt", tmp_path, read_back=False)
    g, params, _, _ = tc.load("llama", scanned=True)
    back, _ = io.load_peft_adaption_prompt(tmp_path / "pj_llama_adaption_prompt",
                                           num_layers=2, hidden_size=16)
    script = tc._script("peft_adaption_prompt_from_peftjax.py")
    np.testing.assert_allclose(script.logits(g, params, back),
                               out["pj_llama_adaption_prompt"], rtol=0, atol=1e-5)
