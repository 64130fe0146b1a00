"""PEFT LoKr (``peft_type: LOKR``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_lokr_make.py`` (torch side: Llama with
``decompose_both`` and rank/alpha patterns, BERT with ``decompose_factor=2``)
and ``scripts/golden/peft_lokr_from_peftjax.py`` (peftjax side); the checks
are ``tests/io/tuner_checks.py``'s.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io, tree
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_lokr"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True), ("bert", False)],
                         ids=["llama-unrolled", "llama-scanned", "bert"])
def test_peft_made_lokr_gives_torch_outputs(kind, scanned, tmp_path):
    # and PEFT -> peftjax -> PEFT writes PEFT's own tensors back
    ad = tc.check_peft_made(GOLDEN, "lokr", kind, scanned=scanned, roundtrip=tmp_path)
    t = ad.state.trainable
    peft_cfg = json.loads((GOLDEN / f"{kind}_lokr" / "adapter_config.json").read_text())
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    for field in ("decompose_both", "decompose_factor"):
        assert written[field] == peft_cfg[field], field
    if kind == "llama":  # r=4, alpha=8, decompose_both; down r=1; v alpha=6
        q = "layers/self_attn/q_proj/kernel" if scanned else "layers/0/self_attn/q_proj/kernel"
        d, v = q.replace("self_attn/q_proj", "mlp/down_proj"), q.replace("q_proj", "v_proj")
        assert repr(ad.assignment[q]).startswith("lokr(rank=4, alpha=8,")
        assert repr(ad.assignment[v]).startswith("lokr(rank=4, alpha=6,")
        assert repr(ad.assignment[d]).startswith("lokr(rank=1, alpha=8,")
        assert t[q].w1 is not None and t[q].w2 is not None  # q (4x4 ⊗ 4x4): both full
        assert t[d].w1 is None and t[d].w2 is None  # down at rank 1: both decomposed
        assert tc.trainable_count(ad.state) == 152
    else:  # decompose_factor=2: 16 -> 2x8, 24 -> 2x12; w1 full, w2 at rank 2
        q, i = "layers/0/attention/query/kernel", "layers/0/intermediate/kernel"
        assert repr(ad.assignment[q]).startswith("lokr(rank=2, alpha=3,")
        assert t[q].w1.shape == (2, 2) and t[q].w2 is None
        assert t[q].w2_a.shape == (2, 8) and t[q].w2_b.shape == (8, 2)  # transposed
        assert t[i].w2_a.shape == (2, 12) and t[i].w2_b.shape == (8, 2)


def test_peftjax_written_lokr_is_what_peft_verified(tmp_path):
    outputs = tc.check_peftjax_written(GOLDEN, "lokr", tmp_path)
    base = np.load(GOLDEN / "torch_outputs.npz")
    for d, out in outputs.items():  # the written adapters move the outputs
        kind = d.split("_")[1]
        assert np.max(np.abs(tc._mask(kind, out) - tc._mask(kind, base[f"{kind}_base"]))) \
            > 100 * tc.TORCH_ATOL, d
    # both factors full on k_proj (rank 8 in peftjax): written at a rank that
    # keeps them full in PEFT, with alpha = s·r (s = 4/8)
    cfg = json.loads((tmp_path / "pj_llama_lokr" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["alpha"], cfg["decompose_both"]) == (1, 3, True)
    assert cfg["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 4
    assert cfg["alpha_pattern"]["model.layers.0.self_attn.k_proj"] == 2
    cfg = json.loads((tmp_path / "pj_bert_lokr" / "adapter_config.json").read_text())
    assert (cfg["decompose_both"], cfg["decompose_factor"]) == (False, 2)


def test_lokr_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "lokr", tmp_path, {
        "rank_dropout": 0.1, "module_dropout": 0.2, "rank_dropout_scale": True,
        "use_effective_conv2d": True, "decompose_factor": 0})
    # a decompose_factor that splits the modules otherwise than the tensors do
    _, params, key_map, _ = tc.load("llama")
    d = tmp_path / "factor"
    d.mkdir()
    cfg = json.loads((GOLDEN / "llama_lokr" / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "decompose_factor": 2}))
    (d / "adapter_model.safetensors").write_bytes(
        (GOLDEN / "llama_lokr" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="give shapes"):
        io.load_peft(d, params, key_map=key_map)


def test_save_refuses_lokr_mixes_no_peft_config_builds(tmp_path):
    w = {"q": {"kernel": jnp.zeros((16, 16))}, "k": {"kernel": jnp.zeros((16, 16))}}
    km = {"q/kernel": io.PeftKey("q", "weight", io.TensorLayout.KERNEL),
          "k/kernel": io.PeftKey("k", "weight", io.TensorLayout.KERNEL)}
    a = tree.assign(w, [tree.Rule(where="q/kernel", then=adapters.lokr(1)),
                        tree.Rule(where="k/kernel", then=adapters.lokr(1, decompose_factor=2))])
    st = adapters.init(a, jax.random.key(0), w)
    with pytest.raises(ValueError, match="no single PEFT decompose_factor"):
        io.save_peft(tmp_path, a, st, w, key_map=km)
