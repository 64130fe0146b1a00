"""BERT merged export: reload in peftjax, HF names, errors, and transformers' outputs.

The golden half: ``scripts/golden/peft_export_make.py`` merged a LoRA into the
committed tiny BERT and wrote it with ``bert.save_hf`` (once as BERT, once as
RoBERTa); ``scripts/golden/peft_export_verify.py`` loaded those files with
transformers' ``AutoModel`` and saved its last hidden states (and summary
statistics of every tensor it loaded). The test regenerates the export,
asserts its tensors equal the files transformers loaded within a stated bound
(merged weights are computed: never compared by bytes, XLA's kernels differ
between CPUs), and compares peftjax's hidden states with transformers'.
Conversion: torch ``Linear.weight (out, in)`` = Flax ``kernel.T``.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import bert
from tests.helpers import EXACT, assert_tensors_close, assert_verified_stats

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPORT = ROOT / "tests" / "io" / "golden" / "peft" / "export"
# The bar for torch vs peftjax outputs (float32, different kernels).
TORCH_ATOL = 1e-4
# Regenerated merged weights vs the committed ones: |new - old| <= MERGED_REL ·
# max|old| per tensor. A rank-4 merge W + s·AB in float32 is within
# (K + 1)·2^-24·(|W| + s|A||B|) of the exact value on any correct kernel; the
# committed tensors are within 1.2e-7·max|W'| of a float64 merge, so two CPUs
# agree to ~1e-6·max|W'|: 1e-5 leaves a 10x margin.
MERGED_REL = 1e-5


def tiny(num_labels=None, model_type="bert"):
    cfg = bert.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
        model_type=model_type,
        pad_token_id=1 if model_type == "roberta" else 0,
    )
    if num_labels is None:
        abstract = nnx.eval_shape(lambda: bert.BertModel(cfg, rngs=nnx.Rngs(0)))
    else:
        abstract = nnx.eval_shape(
            lambda: bert.BertForSequenceClassification(
                cfg, num_labels=num_labels, rngs=nnx.Rngs(0)
            )
        )
    g, shapes = pm.split_params(abstract)
    rng = np.random.default_rng(0)
    params = tree.map_with_path(
        lambda p, s: jnp.asarray(
            (1.0 if p.endswith("scale") else 0.0) + 0.3 * rng.standard_normal(s.shape),
            jnp.float32,
        ),
        shapes,
    )
    return cfg, g, params


def test_merged_export_reloads_identically(tmp_path):
    """A classification model (RoBERTa positions) merged, exported and reloaded."""
    cfg, g, params = tiny(num_labels=3, model_type="roberta")
    a = tree.assign(
        params,
        [
            tree.Rule(
                where=r"layers/\d+/attention/(query|value)/kernel",
                then=adapters.lora(2, alpha=4.0),
            )
        ],
    )
    st = adapters.init(a, jax.random.key(0), params)
    st = adapters.AdapterState(jax.tree.map(lambda x: x + 0.2, st.trainable), st.frozen)
    merged = adapters.fold(a, params, *st)
    d = bert.save_hf(tmp_path / "m", merged, cfg)
    assert bert.BertConfig.from_hf(json.loads((d / "config.json").read_text())) == cfg
    model = bert.load_bert(d, num_labels=3)
    _, back = pm.split_params(model)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **EXACT), back, merged)
    ids = jnp.asarray([[2, 5, 7, 9], [3, 4, 1, 1]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.int32)
    fwd = jax.jit(lambda p: pm.apply(g, p, ids, attention_mask=mask))
    np.testing.assert_array_equal(fwd(back), fwd(merged))
    # the merge changed the outputs (non-zero B), the export kept the change
    assert np.max(np.abs(np.asarray(fwd(back)) - np.asarray(fwd(params)))) > 1e-2
    encoder = bert.load_bert(d)  # the encoder alone ignores the classifier
    assert "classifier" not in pm.split_params(encoder)[1]


def test_params_to_hf_names_layouts_and_errors():
    cfg, _, params = tiny()
    t = bert.params_to_hf(params, cfg)
    assert len(t) == 5 + 2 * 16  # embeddings (3 tables + LayerNorm) + 16 per layer
    lay = params["layers"][1]
    np.testing.assert_array_equal(
        t["encoder.layer.1.intermediate.dense.weight"],
        np.asarray(lay["intermediate"]["kernel"]).T,
    )
    assert t["encoder.layer.1.intermediate.dense.weight"].shape == (12, 8)
    np.testing.assert_array_equal(
        t["encoder.layer.1.output.LayerNorm.weight"], lay["output_norm"]["scale"]
    )
    np.testing.assert_array_equal(
        t["encoder.layer.1.attention.output.dense.bias"],
        lay["attention"]["output"]["bias"],
    )
    np.testing.assert_array_equal(
        t["embeddings.token_type_embeddings.weight"],
        params["embeddings"]["token_type_embeddings"]["embedding"],
    )
    # the loader reads these names back to the same tree
    back = bert.params_from_hf(t, cfg)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **EXACT), back, params)

    bad = jax.tree.map(lambda x: x, params)
    bad["layers"][0]["intermediate"]["kernel"] = jnp.zeros((8, 13), jnp.float32)
    with pytest.raises(
        ValueError, match=r"layers/0/intermediate/kernel.*\(8, 13\).*\(8, 12\)"
    ):
        bert.params_to_hf(bad, cfg)
    bad = jax.tree.map(lambda x: x, params)
    del bad["layers"][1]["output_norm"]
    with pytest.raises(ValueError, match=r"missing.*layers/1/output_norm/bias"):
        bert.params_to_hf(bad, cfg)
    bad = jax.tree.map(lambda x: x, params)
    bad["layers"][2] = params["layers"][0]
    with pytest.raises(
        ValueError, match=r"'layers/2/.*not a parameter.*num_hidden_layers=2"
    ):
        bert.params_to_hf(bad, cfg)


def test_transformers_loads_the_export_with_peftjax_outputs(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "peft_export_make", ROOT / "scripts" / "golden" / "peft_export_make.py"
    )
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    outputs = make.build_bert(tmp_path)
    torch_out = np.load(EXPORT / "torch_outputs.npz")
    verified = json.loads((EXPORT / "verified.json").read_text())
    inputs = np.load(EXPORT.parent / "torch_outputs.npz")
    m = inputs["mask_bert"].astype(bool)  # padded positions are not compared
    for name in ("bert_merged", "roberta_merged"):
        new, _ = io.read_safetensors(tmp_path / name / "model.safetensors")
        old, _ = io.read_safetensors(EXPORT / name / "model.safetensors")
        assert_tensors_close(new, old, MERGED_REL, name)
        assert (tmp_path / name / "config.json").read_text() == (
            EXPORT / name / "config.json"
        ).read_text()
        # transformers loaded the committed tensors, within the bar...
        assert_verified_stats(verified[name]["tensor_stats"], old, name)
        assert verified[name]["max_abs_diff"] <= TORCH_ATOL
        # ...and its hidden states are peftjax's
        np.testing.assert_allclose(
            outputs[name][m], torch_out[name][m], rtol=0, atol=TORCH_ATOL
        )
    # the export reloads in peftjax to the same outputs, bit for bit
    ids, mask = jnp.asarray(inputs["inputs_bert"]), jnp.asarray(inputs["mask_bert"])
    g, p = pm.split_params(bert.load_bert(tmp_path / "bert_merged"))
    got = pm.apply(g, p, ids, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(got), outputs["bert_merged"])
    # the merged LoRA moved the outputs well beyond the bar
    g, p = pm.split_params(bert.load_bert(EXPORT.parent / "bert_base"))
    base = np.asarray(pm.apply(g, p, ids, attention_mask=mask))
    assert np.max(np.abs(base[m] - outputs["bert_merged"][m])) > 100 * TORCH_ATOL
