"""Real checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF) against torch goldens.

The goldens were produced by ``scripts/golden/make_golden.py`` with torch
transformers loading the same GGUF (dequantised to float32). Note: the weights
are a 4-bit dequantisation, so the perplexity here is not comparable with
published SmolLM2 figures.
"""

import hashlib
import os

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from peftjax import models as pm
from peftjax.models import llama
from tests.models.conftest import GOLDEN_DIR, passage

# The parity bar: max|diff| <= 1e-4 * max|ref| per sequence (float32
# model, 30 layers, compared with torch's float32 CPU kernels).
GOLDEN_REL = 1e-4
# Perplexity bar from the issue: equal to the torch golden within 1 %.
PPL_REL = 1e-2
# Generation: golden top-1/top-2 logit margin required at every compared step.
MIN_MARGIN = 0.05

# All real-SmolLM2 tests live in this file: under ``--dist loadfile`` one xdist
# worker loads and compiles the checkpoint once (with ``--dist load`` each
# worker that gets one of these tests loads it).
pytestmark = pytest.mark.slow

# Hand-checked ids of inputs.json's tokenizer probe: '<|im_start|>' is one
# special token (1); "1984" splits into single digits ('1'=33 '9'=41 '8'=40
# '4'=36) with the preceding space alone ('Ġ'=216); a run of 3 spaces before
# "naïve" is 'ĠĠ' (256) + 'Ġna' (15486); two tabs are two 'ĉ' (197).
PROBE_IDS = [
    1,
    4093,
    198,
    788,
    216,
    33,
    41,
    40,
    36,
    28,
    216,
    260,
    37366,
    5019,
    216,
    33,
    34,
    1650,
    22069,
    3030,
    1841,
    256,
    15486,
    46494,
    17,
    197,
    197,
    68,
    7366,
    2,
]


def test_tokenizer_pinned_ids(smollm2, golden):
    s = golden.inputs["smollm2"]
    assert smollm2.tokenizer.encode(s["tokenizer_probe"]).ids == PROBE_IDS
    assert s["tokenizer_probe_ids"] == PROBE_IDS
    assert (
        smollm2.tokenizer.decode(PROBE_IDS, skip_special_tokens=False)
        == (s["tokenizer_probe"])
    )
    # The golden inputs are still what this tokenizer produces.
    assert smollm2.tokenizer.encode(passage(golden, "ppl")).ids[:256] == s["ppl_ids"]
    assert (
        smollm2.tokenizer.encode(passage(golden, "logits_a")).ids[:80]
        == (s["logits_ids"][0])
    )


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_goldens_were_made_from_these_files(golden):
    sha = golden.meta["sha256"]
    assert _sha256(pm.smollm2_gguf()) == sha["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert (
        _sha256(os.path.join(pm.minilm_dir(), "model.safetensors"))
        == (sha["all-MiniLM-L6-v2/model.safetensors"])
    )
    assert _sha256(os.path.join(GOLDEN_DIR, "inputs.json")) == sha["inputs.json"]
    assert golden.meta["versions"]["transformers"] == "5.23.0"


def test_config_from_gguf(smollm2):
    c = smollm2.config
    assert (
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        c.intermediate_size,
    ) == (30, 576, 9, 3, 49152, 1536)
    assert c.tie_word_embeddings and c.rope_theta == 1e5
    assert "lm_head" not in smollm2.params


def test_golden_logits(smollm2, golden):
    s, g = golden.inputs["smollm2"], golden.smollm2
    ids = jnp.asarray(s["logits_ids"], jnp.int32)
    mask = np.asarray(s["logits_mask"], bool)
    logits = np.asarray(
        smollm2.forward(smollm2.params, ids, jnp.asarray(mask)), np.float64
    )
    for i in range(ids.shape[0]):
        ours, m = logits[i][mask[i]], mask[i]
        bound = GOLDEN_REL * g["logits_max_abs"][i]
        cols = np.abs(ours[:, g["logits_columns"]] - g["logits_at_columns"][i][m]).max()
        assert cols <= bound, (i, cols, bound)
        top = np.take_along_axis(ours, g["logits_top_ids"][i][m], axis=-1)
        assert np.abs(top - g["logits_top_values"][i][m]).max() <= bound
        np.testing.assert_array_equal(ours.argmax(-1), g["logits_top_ids"][i][m][:, 0])
        mx = ours.max(-1, keepdims=True)
        lse = np.log(np.exp(ours - mx).sum(-1)) + mx[:, 0]
        assert np.abs(lse - g["logits_logsumexp"][i][m]).max() <= bound


def test_perplexity(smollm2, golden):
    ids = jnp.asarray([golden.inputs["smollm2"]["ppl_ids"]], jnp.int32)
    logits = np.asarray(
        smollm2.forward(smollm2.params, ids, jnp.ones_like(ids)), np.float64
    )[0, :-1]
    mx = logits.max(-1, keepdims=True)
    logp = logits - (np.log(np.exp(logits - mx).sum(-1, keepdims=True)) + mx)
    nll = -np.take_along_axis(logp, np.asarray(ids[0, 1:])[:, None], -1).mean()
    ppl, ref = float(np.exp(nll)), golden.meta["smollm2"]["ppl"]
    assert abs(ppl - ref) <= PPL_REL * ref, (ppl, ref)


def test_greedy_generation_matches_golden(smollm2, golden):
    s, gens = golden.inputs["smollm2"], golden.meta["smollm2"]["generations"]
    k = 1  # "List the first five planets ...": "1. Mercury\n2. Venus\n..."
    want = gens[k]["tokens"][:16]
    assert min(gens[k]["margins"][:16]) >= MIN_MARGIN
    prompt = jnp.asarray([s["generation_prompt_ids"][k]], jnp.int32)
    out = llama.generate(smollm2.model, prompt, max_new_tokens=16)
    assert np.asarray(out[0]).tolist() == want
    text = smollm2.tokenizer.decode(want)
    assert "Mercury" in text and "Venus" in text and "Earth" in text


def test_load_both_layouts(smollm2):
    unrolled = llama.load_llama(pm.smollm2_gguf(), scan_layers=False)
    _, p = pm.split_params(unrolled)
    assert "layers/29/self_attn/q_proj/kernel" in tree.paths(p)
    assert smollm2.params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (
        30,
        576,
        192,
    )
    want = tree.leaves_by_path(tree.unstack_layers(smollm2.params))
    got = tree.leaves_by_path(p)
    assert list(got) == list(want)  # same paths, same order
    for path, value in got.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]))


def test_zero_length_prompt_and_prefix_equal_base(smollm2):
    """Prompt/prefix-tuned SmolLM2 with length-0 parameters is the base model."""


    cfg = smollm2.config
    ids = jnp.asarray([[1, 504, 3458, 282, 1345, 30]], jnp.int32)
    base = pm.apply(smollm2.graphdef, smollm2.params, ids)
    prompt = jnp.zeros((0, cfg.hidden_size), jnp.float32)
    kv = jnp.zeros((cfg.num_hidden_layers, 0, cfg.num_key_value_heads, cfg.dim_head))
    np.testing.assert_array_equal(
        np.asarray(pm.apply(smollm2.graphdef, smollm2.params, ids,
                            prompt_embeddings=prompt)), np.asarray(base))
    np.testing.assert_array_equal(
        np.asarray(pm.apply(smollm2.graphdef, smollm2.params, ids,
                            prefix=adapters.PrefixParams(keys=kv, values=kv))),
        np.asarray(base))
