"""Exports PEFT must reproduce: inits over a modified base, and tied heads.

``scripts/golden/peft_export_make.py`` wrote, from committed inputs and
NumPy-seeded values: PiSSA / OLoRA / LoRA-GA / CorDA adapters on the tiny
Llama, trained (a non-zero update of every factor) over their residual bases,
converted by ``inits.to_lora`` to rank-2r LoRAs over the *unmodified* base
and saved with ``io.save_peft``; a tiny tied-embedding Llama with a LoRA on
the tied table and one with the table trained in full (``tied_head``).
``scripts/golden/peft_export_verify.py`` loaded each in PEFT / transformers
(torch side), saved the torch logits and summary statistics of the tensors
it loaded, and created two PEFT adapters for the read direction: one on the
tied table (``ensure_weight_tying=True``) and a trained PiSSA adapter PEFT
converted itself (``path_initial_model_for_weight_conversion``). The tests regenerate
the exports, assert they equal the files torch loaded within a stated bound
(computed tensors are never compared by bytes: XLA's and LAPACK's kernels
differ between CPUs), and compare logits. Conversion: torch ``lora_A (r,
in)`` = Flax ``a.T``, ``lora_B (out, r)`` = ``b.T``; ``lora_embedding_A (r,
V)`` = ``a.T``, ``lora_embedding_B (d, r)`` = ``b.T``.
"""

import importlib.util
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io
from peftjax import models as pm
from peftjax.models import llama
from tests.helpers import MATMUL_F32, assert_tensors_close, assert_verified_stats

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "io" / "golden" / "peft"
EXPORT = GOLDEN / "export"
# The bar for torch vs peftjax outputs (float32, different kernels).
TORCH_ATOL = 1e-4
# Regenerated exports vs the committed ones: |new - old| <= rel · max|old| per
# tensor. COPY_REL for the tied exports (NumPy-seeded copies and a table +
# noise sum: at most a few float32 roundings, ~1e-7). INIT_REL for the
# PiSSA/OLoRA/LoRA-GA/CorDA factors: SVD/QR outputs move with LAPACK's
# kernels by ~u·|W|/gap; rerun with OpenBLAS's Prescott and Sandybridge
# kernels they moved by at most 4.3e-5·max|old| (LoRA-GA, layer 1 up_proj):
# 1e-3 leaves a 20x margin, and the logits are checked against torch's at
# TORCH_ATOL as well.
COPY_REL = 1e-5
INIT_REL = 1e-3
INITS = {"pj_pissa": 2, "pj_olora": 2, "pj_lora_ga": 2, "pj_corda": 2}  # rank r


@pytest.fixture(scope="module")
def make():
    spec = importlib.util.spec_from_file_location(
        "peft_export_make", ROOT / "scripts" / "golden" / "peft_export_make.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def torch_out():
    return dict(np.load(EXPORT / "torch_outputs.npz"))


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.load(GOLDEN / "torch_outputs.npz")["inputs_llama"])


def assert_verified_tensors(out, name, weights, config, rel):
    """Regenerated tensors ≈ committed ones (``rel``) = the ones torch loaded."""
    new, _ = io.read_safetensors(out / name / weights)
    old, _ = io.read_safetensors(EXPORT / name / weights)
    assert_tensors_close(new, old, rel, name)
    assert json.loads((out / name / config).read_text()) == json.loads(
        (EXPORT / name / config).read_text()
    )
    verified = json.loads((EXPORT / "verified.json").read_text())
    assert_verified_stats(verified[name]["tensor_stats"], old, name)
    assert verified[name]["max_abs_diff"] <= TORCH_ATOL, name


def close_f32(got, want):
    """MATMUL_F32 with atol scaled by max|want| (logits of a float32 model)."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(
        np.asarray(got, np.float64),
        want,
        rtol=MATMUL_F32["rtol"],
        atol=MATMUL_F32["rtol"] * np.abs(want).max(),
    )


def test_init_exports_are_plain_lora_over_the_original_base(
    make, tmp_path, torch_out, ids
):
    outputs = make.build_inits(tmp_path)  # the trained models, over residual bases
    model = llama.load_llama(GOLDEN / "llama_base", scan_layers=True)
    g, params = pm.split_params(model)  # the ORIGINAL base
    km = llama.peft_key_map(model.config)
    fwd = make.forward(g)  # the compiled forward of build_inits
    base = np.asarray(fwd(params, ids))
    for name, r in INITS.items():
        trained = outputs[name]
        assert np.max(np.abs(trained - base)) > 100 * TORCH_ATOL, name  # trained
        back = io.load_peft(tmp_path / name, params, key_map=km)
        cfg = back.config
        assert cfg["init_lora_weights"] is True and cfg["r"] == 2 * r, name
        got = fwd(adapters.materialize(back.assignment, params, *back.state), ids)
        close_f32(got, trained)  # peftjax: the export reproduces the trained model
        np.testing.assert_allclose(trained, torch_out[name], rtol=0, atol=TORCH_ATOL)
        assert_verified_tensors(
            tmp_path, name, "adapter_model.safetensors", "adapter_config.json", INIT_REL
        )
    # PiSSA on v_proj had rank 4 next to q_proj's 2: 8 vs 4 after conversion
    cfg = json.loads((tmp_path / "pj_pissa" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {
        f"model.layers.{i}.self_attn.v_proj": 8 for i in range(2)
    }
    cfg = json.loads((tmp_path / "pj_lora_ga" / "adapter_config.json").read_text())
    # rsLoRA keeps alpha/sqrt(r) with alpha' = sqrt(2)·alpha at rank 2r
    assert cfg["use_rslora"] is True
    assert np.float32(cfg["lora_alpha"] / np.sqrt(4)) == np.float32(4.0 / np.sqrt(2))


def test_tied_head_exports_match_peft(make, tmp_path, torch_out, ids):
    outputs = make.build_tied(tmp_path)
    assert_verified_tensors(
        tmp_path, "llama_tied_base", "model.safetensors", "config.json", COPY_REL
    )
    model = llama.load_llama(tmp_path / "llama_tied_base", scan_layers=True)
    assert model.config.tie_word_embeddings
    g, params = pm.split_params(model)
    assert "lm_head" not in params
    km = llama.peft_key_map(model.config)
    np.testing.assert_allclose(
        outputs["llama_tied_base"],
        torch_out["llama_tied_base"],
        rtol=0,
        atol=TORCH_ATOL,
    )
    for name in ("pj_tied_embed", "pj_tied_full"):
        assert_verified_tensors(
            tmp_path, name, "adapter_model.safetensors", "adapter_config.json", COPY_REL
        )
        # PEFT (ensure_weight_tying) adapts the head as peftjax's shared table does
        np.testing.assert_allclose(
            outputs[name], torch_out[name], rtol=0, atol=TORCH_ATOL
        )
        assert (
            np.max(np.abs(outputs[name] - outputs["llama_tied_base"]))
            > 100 * TORCH_ATOL
        )
    back = io.load_peft(
        tmp_path / "pj_tied_full", params, key_map=km, tied_head=make.TIE
    )
    np.testing.assert_array_equal(
        back.full[make.TIE[0]],
        io.read_safetensors(tmp_path / "pj_tied_full" / "adapter_model.safetensors")[0][
            "base_model.model.lm_head.weight"
        ],
    )


def test_peft_made_tied_adapter_loads(make, torch_out, ids):
    model = llama.load_llama(EXPORT / "llama_tied_base", scan_layers=True)
    g, params = pm.split_params(model)
    km = llama.peft_key_map(model.config)
    d = EXPORT / "peft_tied_embed"
    ad = io.load_peft(
        d, params, key_map=km, tied_head=("embed_tokens/embedding", "lm_head")
    )
    assert sorted(ad.assignment) == [
        "embed_tokens/embedding",
        "layers/self_attn/q_proj/kernel",
    ]
    p = adapters.materialize(ad.assignment, params, *ad.state)
    got = np.asarray(make.forward(g)(p, ids))  # compiled by build_tied
    np.testing.assert_allclose(
        got, torch_out["peft_tied_embed"], rtol=0, atol=TORCH_ATOL
    )
    assert np.max(np.abs(got - torch_out["llama_tied_base"])) > 100 * TORCH_ATOL
    # the head's tensors are there: without tied_head they match no module
    with pytest.raises(ValueError, match=r"lm_head.lora_A.weight.*pass tied_head"):
        io.load_peft(d, params, key_map=km)


def test_peft_converted_pissa_loads_on_the_original_base(make, torch_out, ids):
    model = llama.load_llama(GOLDEN / "llama_base", scan_layers=True)
    g, params = pm.split_params(model)
    ad = io.load_peft(
        EXPORT / "peft_pissa_converted",
        params,
        key_map=llama.peft_key_map(model.config),
    )
    assert ad.config["r"] == 4  # rank 2r
    p = adapters.materialize(ad.assignment, params, *ad.state)
    got = np.asarray(make.forward(g)(p, ids))
    np.testing.assert_allclose(
        got, torch_out["peft_pissa_converted"], rtol=0, atol=TORCH_ATOL
    )
    assert (
        np.max(np.abs(got - np.asarray(make.forward(g)(params, ids))))
        > 100 * TORCH_ATOL
    )
