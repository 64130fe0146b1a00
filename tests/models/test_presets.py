"""Per-family target presets (issue 12 item 4): which paths each preset picks,
in both Llama layouts and in BERT, against hand-written path lists; and
``all_linear_rules`` equals PEFT's ``"all-linear"`` through the translator."""

import pytest
from flax import nnx

from peftjax import models as pm
from peftjax import tree
from peftjax.models import bert, llama

LCFG = llama.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12,
                         num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=False)
BCFG = bert.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=12)
ATTN = ["self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj"]
MLP = ["mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]


def _llama(scan):
    return pm.split_params(nnx.eval_shape(
        lambda: llama.LlamaForCausalLM(LCFG, scan_layers=scan, rngs=nnx.Rngs(0))))[1]


def _paths(subs, scan):
    if scan:
        return {f"layers/{s}/kernel" for s in subs}
    return {f"layers/{i}/{s}/kernel" for i in range(2) for s in subs}


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_llama_presets(scan):
    params = _llama(scan)
    cases = {llama.attention_rules: ATTN, llama.mlp_rules: MLP,
             llama.attention_mlp_rules: ATTN + MLP, llama.all_linear_rules: ATTN + MLP}
    for preset, subs in cases.items():
        assignment = tree.assign(params, preset("lora"))
        assert set(assignment) == _paths(subs, scan), preset.__name__
        assert set(assignment.values()) == {"lora"}
    # PEFT's "all-linear" on the untied model selects the same paths (lm_head out).
    peft = tree.assign(params, llama.peft_rules(LCFG, "all-linear", "lora",
                                                scanned=scan))
    assert set(peft) == _paths(ATTN + MLP, scan)


def test_bert_presets_and_all_linear_leaves_the_classifier_out():
    model = nnx.eval_shape(lambda: bert.BertForSequenceClassification(
        BCFG, num_labels=3, rngs=nnx.Rngs(0)))
    params = pm.split_params(model)[1]
    attn = ["attention/query", "attention/key", "attention/value", "attention/output"]
    mlp = ["intermediate", "output"]
    cases = {bert.attention_rules: attn, bert.mlp_rules: mlp,
             bert.attention_mlp_rules: attn + mlp, bert.all_linear_rules: attn + mlp}
    for preset, subs in cases.items():
        assert set(tree.assign(params, preset("lora"))) == _paths(subs, False)
    peft = tree.assign(params, bert.peft_rules(BCFG, "all-linear", "lora",
                                               num_labels=3))
    assert set(peft) == _paths(attn + mlp, False)
    # PEFT's BERT default, and its module names with the classification prefix.
    assert set(tree.assign(params, bert.peft_rules(BCFG, None, "lora", num_labels=3))
               ) == _paths(["attention/query", "attention/value"], False)
    regex = r"bert\.encoder\.layer\.1\.(intermediate|output)\.dense"
    assert set(tree.assign(params, bert.peft_rules(BCFG, regex, "lora", num_labels=3))
               ) == {"layers/1/intermediate/kernel", "layers/1/output/kernel"}
    with pytest.raises(ValueError,
                       match="'bert.embeddings.LayerNorm', a vector tensor"):
        bert.peft_rules(BCFG, ["LayerNorm"], "lora", num_labels=3)
