"""PEFT LN tuning (``peft_type: LN_TUNING``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_ln_tuning_make.py`` (torch side: Llama's three
RMSNorms by a list; BERT's LayerNorms, scale and bias, by a regex with one
excluded) and ``scripts/golden/peft_ln_tuning_from_peftjax.py`` (peftjax
side); the checks are ``tests/io/tuner_checks.py``'s. LN tuning has no
factored form: the factored path materialises (with its warning).
"""

import json
import pathlib
import re

import jax
import numpy as np
import pytest

from peftjax import adapters, io, tree
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_ln_tuning"
COPY = "base_model.model.{}.ln_tuning_layers.{}"
BERT_MODULES = ["embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm",
                "encoder.layer.0.output.LayerNorm", "encoder.layer.1.output.LayerNorm"]


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True), ("bert", False)],
                         ids=["llama-unrolled", "llama-scanned", "bert"])
def test_peft_made_ln_tuning_gives_torch_outputs(kind, scanned, tmp_path):
    # and PEFT -> peftjax -> PEFT writes PEFT's own tensors back
    ad = tc.check_peft_made(GOLDEN, "ln_tuning", kind, scanned=scanned, fallback=True,
                            roundtrip=tmp_path)
    assert ad.full == {}
    _, params, key_map, _ = tc.load(kind, scanned=scanned)
    # by hand, without peftjax.io: each copy is PEFT's tensor (stacked when scanned)
    tensors, _ = io.read_safetensors(GOLDEN / f"{kind}_ln_tuning" / "adapter_model.safetensors")
    want = {p: tensors.pop(COPY.format(k.module, k.tensor)) for p, k in key_map.items()
            if COPY.format(k.module, k.tensor) in tensors}
    assert not tensors, sorted(tensors)
    if scanned:  # the per-layer tensors stacked on the layer axis
        assert {re.sub(r"^layers/\d+/", "layers/", p) for p in want} == set(ad.state.trainable)
        want = {p: (np.stack([want[p.replace("layers/", f"layers/{i}/", 1)] for i in range(2)])
                    if p.startswith("layers/") else want[p]) for p in ad.state.trainable}
    assert sorted(want) == sorted(ad.state.trainable)
    for p, v in want.items():
        np.testing.assert_array_equal(np.asarray(ad.state.trainable[p].value), v, err_msg=p)
    # PEFT's merge swaps the copy in; unmerge gives the base back exactly
    merged, aux = adapters.fold(ad.assignment, params, *ad.state, return_aux=True)
    jax.tree.map(np.testing.assert_array_equal,
                 adapters.unfold(ad.assignment, merged, *ad.state, aux=aux), params)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LN_TUNING"
    if kind == "bert":  # both tensors of 4 LayerNorms; layer 1's attention norm excluded
        assert cfg["target_modules"] == BERT_MODULES
        assert "layers/1/attention_norm/scale" not in ad.assignment
        assert {p.rsplit("/", 1)[1] for p in ad.assignment} == {"scale", "bias"}
        assert tc.trainable_count(ad.state) == 128
    else:  # 2 layers x 2 RMSNorms + model.norm
        assert len(cfg["target_modules"]) == 5
        assert tc.trainable_count(ad.state) == 80


def test_peftjax_written_ln_tuning_is_what_peft_verified(tmp_path):
    outputs = tc.check_peftjax_written(GOLDEN, "ln_tuning", tmp_path)
    report = json.loads((GOLDEN / "peft.json").read_text())
    base = np.load(GOLDEN / "torch_outputs.npz")
    for d, out in outputs.items():  # the written copies move the outputs
        kind = d.split("_")[1]
        assert report[d]["peft_type"] == "LN_TUNING"
        assert np.max(np.abs(tc._mask(kind, out) - tc._mask(kind, base[f"{kind}_base"]))) \
            > 100 * tc.TORCH_ATOL, d
    # BERT: every LayerNorm written whole (weight and bias), scanned Llama unstacked
    t, _ = io.read_safetensors(tmp_path / "pj_bert_ln_tuning" / "adapter_model.safetensors")
    assert sorted(t) == sorted(COPY.format(m, x) for m in BERT_MODULES + [
        "encoder.layer.1.attention.output.LayerNorm"] for x in ("weight", "bias"))
    cfg = json.loads((tmp_path / "pj_llama_ln_tuning" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.0.input_layernorm",
                                     "model.layers.0.post_attention_layernorm",
                                     "model.layers.1.input_layernorm",
                                     "model.layers.1.post_attention_layernorm", "model.norm"]


def test_ln_tuning_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "ln_tuning", tmp_path, {
        "modules_to_save": ["lm_head"], "fan_in_fan_out": True})
    _, params, key_map, _ = tc.load("llama")
    src = GOLDEN / "llama_ln_tuning"
    cfg = json.loads((src / "adapter_config.json").read_text())
    peft_t, _ = io.read_safetensors(src / "adapter_model.safetensors")
    for i, (config, tensors, match) in enumerate([
            ({"target_modules": ["input_layernorm", "q_proj"]}, None,
             "selects 'model.layers.0.self_attn.q_proj'"),
            ({"exclude_modules": ["norm"]}, None, "not LN-tuning copies"),
            ({"target_modules": None}, None, "no target_modules"),
            (None, lambda t: {k: v for k, v in t.items() if "model.norm" not in k}, "lacks"),
            (None, lambda t: {k: v[:8] for k, v in t.items()}, "has shape")]):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
        io.write_safetensors(d / "adapter_model.safetensors",
                             tensors(peft_t) if tensors else peft_t)
        with pytest.raises(ValueError, match=re.escape(match)):
            io.load_peft(d, params, key_map=key_map)
    # PEFT copies a whole LayerNorm: a BERT norm's scale without its bias has no file
    _, params, key_map, _ = tc.load("bert")
    a = tree.assign(params, [tree.Rule(where="layers/0/output_norm/scale",
                                       then=adapters.ln_tuning())])
    st = adapters.init(a, jax.random.key(0), params)
    with pytest.raises(ValueError, match=re.escape("'layers/0/output_norm/bias'")):
        io.save_peft(tmp_path / "half", a, st, params, key_map=key_map)
