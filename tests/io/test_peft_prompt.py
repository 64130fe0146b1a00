"""PEFT prompt-learning files (tests/io/golden/peft_prompts) in both directions.

Made by scripts/golden/peft_prompts_make.py (PEFT 0.21 on the tiny Llama,
every trainable tensor perturbed) and scripts/golden/peft_prompts_from_peftjax.py.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import adapters, io
from peftjax import models as pm
from peftjax.models.llama import KVCache
from tests.io import tuner_checks

GOLDEN = pathlib.Path(__file__).parent / "golden" / "peft_prompts"
_F = tuner_checks._script("peft_prompts_from_peftjax.py")
NAMES = sorted(_F.TYPES)
T = len(_F._peftjax_golden.LLAMA_IDS[0])


def _torch():
    return np.load(GOLDEN / "torch_outputs.npz")


def test_peft_made_files_give_peft_logits():
    ref = _torch()
    report = json.loads((GOLDEN / "peft.json").read_text())
    ours = {"prompt_tuning": 3 * 16, "prefix_tuning": 2 * 2 * 3 * 2 * 4,
            "prefix_projection": 3 * 8 + 8 * 6 + 6 + 6 * 32 + 32,
            "p_tuning_mlp": 3 * 16 + 16 * 6 + 6 + 6 * 6 + 6 + 6 * 16 + 16,
            "p_tuning_lstm": 3 * 16 + 2 * (20 * 16 + 20 * 5 + 40)
            + 2 * (20 * 10 + 20 * 5 + 40) + 10 * 10 + 10 + 10 * 16 + 16,
            "multitask_prompt_tuning": 3 * 16 + 3 * 2 * (3 + 16),
            "cpt": 7 * 16, "cartridge": 2 * 2 * 3 * 2 * 4,
            "bert_prefix_tuning": 2 * 2 * 3 * 16, "bert_cartridge": 2 * 2 * 2 * 16}
    assert report["trainable_params"] == ours
    for name in NAMES:
        p = io.load_peft_prompt(GOLDEN / f"llama_{name}")
        assert p.peft_type == _F.TYPES[name]
        got = _F.llama_logits(**_F.model_kwargs(p.peft_type, p.params, p.config))
        want = ref[f"llama_{name}"][:, -T:]  # PEFT's logits include the prompt's
        tuner_checks.assert_outputs_close("llama", got, want)
        assert np.abs(want - ref["llama_base"]).max() > 0.5, name  # not the identity


def test_cpt_loss_on_peftjax_logits_with_prompt_positions_is_peft_loss():
    # CPT's loss counts label tokens inside the prompt: keep_prompt_logits
    # returns those positions, and the loss on them is PEFT's
    ref = _torch()
    p = io.load_peft_prompt(GOLDEN / "llama_cpt")
    g, params, _, _ = _F._peftjax_golden.load("llama")
    ids = jnp.asarray(ref["inputs_llama"])
    prompt = _F.model_kwargs(p.peft_type, p.params, p.config)["prompt_embeddings"]
    logits = pm.apply(g, params, ids, prompt_embeddings=prompt, keep_prompt_logits=True)
    n = prompt.shape[0]
    assert logits.shape == ref["llama_cpt"].shape
    tuner_checks.assert_outputs_close("llama", logits[:, :n], ref["llama_cpt"][:, :n])
    labels, tmask = adapters.cpt_inputs(ids, jnp.asarray(ref["cpt_input_types"]),
                                        p.config["cpt_token_ids"],
                                        p.config["cpt_tokens_type_mask"])
    loss = adapters.cpt_loss(logits, labels, tmask,
                             loss_type=p.config["opt_weighted_loss_type"],
                             decay_factor=p.config["opt_loss_decay_factor"])
    np.testing.assert_allclose(float(loss), float(ref["cpt_loss"]), rtol=1e-4)


def test_bert_prefix_files_give_peft_outputs():
    # PEFT's BERT puts the real tokens at positions P..P+T-1 (Hugging Face BERT
    # offsets its absolute positions by the cache length); so does peftjax
    ref = _torch()
    g, params, _, _ = _F._peftjax_golden.load("bert")
    ids = jnp.asarray(ref["inputs_bert"])
    mask = jnp.asarray(ref["mask_bert"])
    for name in ("prefix_tuning", "cartridge"):
        p = io.load_peft_prompt(GOLDEN / f"bert_{name}")
        prefix = adapters.cartridge_kv(p.params) if name == "cartridge" else p.params
        assert prefix.keys.shape == (2, 3, 4, 4)  # (L, P, H, D): token_dim = H·D
        got = pm.apply(g, params, ids, attention_mask=mask, prefix=prefix)
        tuner_checks.assert_outputs_close("bert", got, ref[f"bert_{name}"])


def test_peftjax_written_files_load_in_peft(tmp_path):
    report = json.loads((GOLDEN / "peft.json").read_text())
    committed = np.load(GOLDEN / "from_peftjax" / "peftjax_outputs.npz")
    got = _F.build(tmp_path)
    assert sorted(got) == sorted(f"pj_llama_{n}" for n in NAMES)
    for d, out in got.items():
        assert report[d]["passed"] and report[d]["max_abs_diff"] <= tuner_checks.TORCH_ATOL
        np.testing.assert_allclose(out, committed[d], rtol=0, atol=1e-5)
        for f in ("adapter_config.json",):
            assert (json.loads((tmp_path / d / f).read_text())
                    == json.loads((GOLDEN / "from_peftjax" / d / f).read_text()))
        back = io.load_peft_prompt(tmp_path / d)
        again = _F.llama_logits(**_F.model_kwargs(back.peft_type, back.params, back.config))
        np.testing.assert_allclose(again, out, rtol=0, atol=1e-5)


def _copy(tmp_path, name):
    d = tmp_path / name
    shutil.copytree(GOLDEN / f"llama_{name}", d)
    return d


def _edit(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def test_refused(tmp_path):
    d = _copy(tmp_path, "cartridge")
    _edit(d, shiny_new_field=3)
    with pytest.raises(ValueError, match=r"\['shiny_new_field'\] are unknown"):
        io.load_peft_prompt(d)
    d = _copy(tmp_path, "prompt_tuning")
    _edit(d, num_transformer_submodules=2)
    with pytest.raises(ValueError, match="num_transformer_submodules=2"):
        io.load_peft_prompt(d)
    d = _copy(tmp_path, "prefix_tuning")
    _edit(d, num_layers=3)
    with pytest.raises(ValueError, match="num_layers\\*2\\*token_dim"):
        io.load_peft_prompt(d)
    d = _copy(tmp_path, "multitask_prompt_tuning")
    _edit(d, peft_type="LORA")
    with pytest.raises(ValueError, match="load_peft"):
        io.load_peft_prompt(d)
    with pytest.raises(ValueError, match="read it with io.load_peft_prompt"):
        g, params, key_map, _ = _F._peftjax_golden.load("llama")
        io.load_peft(GOLDEN / "llama_cartridge", params, key_map=key_map)
    with pytest.raises(ValueError, match=r"\['bogus'\] are unknown"):
        io.save_peft_prompt(tmp_path / "x", io.load_peft_prompt(
            GOLDEN / "llama_prompt_tuning").params, fields={"bogus": 1})
    with pytest.raises(ValueError, match="cpt_token_ids"):
        io.save_peft_prompt(tmp_path / "y", io.load_peft_prompt(GOLDEN / "llama_cpt").params)


def test_cartridge_from_kv_cache_and_cached_generation():
    """PEFT's initialize_kv_prefix_from_past_key_values <-> the Llama's decode cache;
    greedy decoding after a cache holding the prefix == the explicit prefix forward."""
    ref = _torch()
    g, params, _, _ = _F._peftjax_golden.load("llama")
    model = nnx.merge(g, params)
    decode = jax.jit(lambda tokens, cache: nnx.merge(g, params).decode(tokens, cache))
    text = jnp.asarray([[1, 12, 44, 7, 19, 3]])  # the make script's CARTRIDGE_TEXT
    _, filled = jax.jit(lambda t: model.decode(t, model.init_cache(1, 6)))(text)
    kv = adapters.cartridge_kv_from_cache(filled, 4)
    flat = np.stack([np.asarray(kv.keys), np.asarray(kv.values)], 1).transpose(2, 0, 1, 3, 4)
    np.testing.assert_allclose(flat.reshape(4, -1), ref["cartridge_from_text"], rtol=0,
                               atol=1e-5)
    cart = adapters.cartridge(jax.random.key(0), 4, num_layers=2, num_kv_heads=2,
                              head_dim=4, init_kv=kv)
    got = _F.llama_logits(prefix=adapters.cartridge_kv(cart))
    tuner_checks.assert_outputs_close("llama", got, ref["llama_cartridge_from_text"])
    # generation with the prefix in the KV cache, token for token
    ids = jnp.asarray(_F._peftjax_golden.LLAMA_IDS)[:, :5]
    b, p, steps = ids.shape[0], 4, 4
    s = p + ids.shape[1] + steps

    @jax.jit
    def prefilled(kv):  # a cache whose first P slots hold the prefix
        c = model.init_cache(b, s)
        k = c.k.at[:, :, :p].set(jnp.broadcast_to(kv.keys[:, None], (2, b) + kv.keys.shape[1:]))
        v = c.v.at[:, :, :p].set(jnp.broadcast_to(kv.values[:, None],
                                                  (2, b) + kv.keys.shape[1:]))
        return KVCache(k, v, c.valid.at[:, :p].set(True), jnp.asarray(p, jnp.int32),
                       jnp.full((b,), p, jnp.int32))

    logits, c = decode(ids, prefilled(kv))
    seq, cached = ids, []
    for _ in range(steps):  # greedy, one cached token at a time
        cached.append(logits[:, -1])
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        seq = jnp.concatenate([seq, nxt], axis=1)
        logits, c = decode(nxt, c)
    # the explicit computation: one forward over the whole sequence with the prefix
    explicit = np.asarray(jax.jit(lambda t, kv: pm.apply(g, params, t, prefix=kv))(
        seq, kv))[:, ids.shape[1] - 1:-1]
    np.testing.assert_allclose(np.stack(cached, 1), explicit, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(seq[:, ids.shape[1]:], explicit.argmax(-1))
