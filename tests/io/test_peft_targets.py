"""PEFT ``target_modules`` translation against PEFT's own selection.

``tests/io/golden/peft_targets.json`` (``scripts/golden/peft_targets.py``,
run once with torch + PEFT 0.21.2) records, for each ``LoraConfig`` input,
the module names PEFT adapted on the tiny random Llama of the PEFT-format
goldens, or the error it raised. The translator must select the same
modules, and the rules it makes must assign exactly those modules' weights.
"""

import json
import pathlib

import jax.numpy as jnp
import pytest
from flax import nnx

from peftjax import io, tree
from peftjax import models as pm
from peftjax.models import llama

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = json.loads(
    (ROOT / "tests" / "io" / "golden" / "peft_targets.json").read_text())
CASES = GOLDEN["cases"]
CFG = llama.LlamaConfig.from_hf(json.loads(
    (ROOT / "tests" / "io" / "golden" / "peft" / "llama_base" / "config.json")
    .read_text()))
KEY_MAP = llama.peft_key_map(CFG)


def _shapes(scan):
    model = nnx.eval_shape(lambda: llama.LlamaForCausalLM(CFG, scan_layers=scan,
                                                          rngs=nnx.Rngs(0)))
    return pm.split_params(model)[1]


PARAMS = {False: _shapes(False), True: _shapes(True)}


def _weights_of(modules):
    return {p for p, k in KEY_MAP.items()
            if k.module in modules and k.tensor == "weight"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_selection_equals_peft(name):
    case = CASES[name]
    cfg = dict(case["config"])
    if "error" in case:
        with pytest.raises(ValueError, match="PEFT raises here too"):
            io.peft_target_modules(key_map=KEY_MAP, output_modules=("lm_head",), **cfg)
        with pytest.raises(ValueError, match="PEFT raises here too"):
            llama.peft_rules(CFG, cfg.pop("target_modules"), "x", embedding_then="e",
                             **cfg)
        return
    got = io.peft_target_modules(key_map=KEY_MAP, output_modules=("lm_head",), **cfg)
    assert sorted(got) == case["modules"]
    # The rules assign exactly those modules' weights, embeddings with their
    # own payload, in the unrolled layout ...
    kw = dict(cfg)
    rules = llama.peft_rules(CFG, kw.pop("target_modules"), "lora",
                             embedding_then="emb", **kw)
    assignment = tree.assign(PARAMS[False], rules)
    want = _weights_of(set(case["modules"]))
    assert set(assignment) == want
    assert {p for p, v in assignment.items() if v == "emb"} == {
        p for p in want if p == "embed_tokens/embedding"}
    # ... and in the scanned one, where a partial layer selection is an error.
    per_layer = {}
    for p in want:
        if p.startswith("layers/"):
            _, i, rest = p.split("/", 2)
            per_layer.setdefault(rest, set()).add(int(i))
    partial = any(v != set(range(CFG.num_hidden_layers)) for v in per_layer.values())
    if partial:
        with pytest.raises(ValueError, match="scanned .*use the unrolled layout"):
            llama.peft_rules(CFG, cfg["target_modules"], "lora", embedding_then="emb",
                             scanned=True, **kw)
    else:
        scanned = tree.assign(PARAMS[True], llama.peft_rules(
            CFG, cfg["target_modules"], "lora", embedding_then="emb", scanned=True,
            **kw))
        assert set(scanned) == {f"layers/{r}" for r in per_layer} | (
            want - {p for p in want if p.startswith("layers/")})


def test_golden_covers_the_semantics():
    """The golden exercises what the translator claims to reproduce."""
    assert GOLDEN["versions"]["peft"] == "0.21.2"
    kinds = {type(c["config"]["target_modules"]).__name__ for c in CASES.values()}
    assert kinds == {"list", "str"}
    assert sum("error" in c for c in CASES.values()) >= 4
    assert "lm_head" not in CASES["all_linear"]["modules"]
    assert len(CASES["all_linear"]["modules"]) == 7 * CFG.num_hidden_layers


def test_translator_argument_errors():
    with pytest.raises(TypeError, match="target_modules is None"):
        io.peft_target_modules(None, KEY_MAP)
    with pytest.raises(TypeError, match="target_modules must be a str"):
        io.peft_target_modules(["q_proj", 3], KEY_MAP)
    with pytest.raises(TypeError, match="key_map"):
        io.peft_target_modules(["q_proj"], ["q_proj"])
    with pytest.raises(ValueError, match=r"embedding\(s\) \['embed_tokens/embedding'\]"
                                         ".*embedding_then"):
        io.peft_target_rules(["embed_tokens"], KEY_MAP, "lora")
    # PEFT's Llama default when a recipe leaves target_modules unset.
    rules = llama.peft_rules(CFG, None, "lora")
    assert set(tree.assign(PARAMS[False], rules)) == {
        f"layers/{i}/self_attn/{n}_proj/kernel" for i in range(2) for n in "qv"}


def test_tied_model_has_no_head_module():
    tied = llama.LlamaConfig.from_hf({**CFG.to_hf(), "tie_word_embeddings": True})
    rules = llama.peft_rules(tied, "all-linear", jnp.float32)
    assert len(rules) == 7
    with pytest.raises(ValueError, match="selects no module"):
        llama.peft_rules(tied, ["lm_head"], "lora")
