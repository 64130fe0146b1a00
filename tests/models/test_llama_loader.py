"""Loaders: a tiny synthetic Llama written as HF safetensors and as GGUF (Q/K
permuted as llama.cpp does, n_kv_heads != n_heads) loads to identical logits;
loader errors (unsupported quant type, shape mismatch, missing file, unknown
rope scaling, unsupported architecture, offline Hub id)."""

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import io, tree
from peftjax import models as pm
from peftjax.models import llama
from tests.helpers import BF16, EXACT, MATMUL_F32, f64
from tests.models import _reference

CFG = llama.LlamaConfig(
    vocab_size=40,
    hidden_size=24,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    rope_theta=1e4,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def hf_tensors(cfg, seed=0):
    """HF-named torch-layout (out, in) float32 tensors."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.dim_head

    def w(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    t = {
        "model.embed_tokens.weight": w(cfg.vocab_size, d),
        "model.norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
    }
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = w(cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        t.update(
            {
                pre + "input_layernorm.weight": (
                    1 + 0.1 * rng.standard_normal(d)
                ).astype(np.float32),
                pre + "post_attention_layernorm.weight": np.ones(d, np.float32),
                pre + "self_attn.q_proj.weight": w(cfg.num_attention_heads * hd, d),
                pre + "self_attn.k_proj.weight": w(cfg.num_key_value_heads * hd, d),
                pre + "self_attn.v_proj.weight": w(cfg.num_key_value_heads * hd, d),
                pre + "self_attn.o_proj.weight": w(d, cfg.num_attention_heads * hd),
                pre + "mlp.gate_proj.weight": w(f, d),
                pre + "mlp.up_proj.weight": w(f, d),
                pre + "mlp.down_proj.weight": w(d, f),
            }
        )
    return t


def write_hf(directory, cfg, tensors):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf()))
    io.write_safetensors(directory / "model.safetensors", tensors)
    return directory


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf's ``permute`` (interleaves the RoPE halves)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(path, cfg, tensors, *, overrides=None, arch="llama"):
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
    }
    permute = arch == "llama"  # llama.cpp permutes Q/K only for llama
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(128)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for key, value in (overrides or {}).items():
        w.add_string(key, value)
    for name, arr in tensors.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers.") :].split(".", 1)
            out = f"blk.{i}.{layer[rest]}"
            if permute and rest.startswith("self_attn.q_proj"):
                arr = llama_cpp_permute(arr, cfg.num_attention_heads)
            elif permute and rest.startswith("self_attn.k_proj"):
                arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        else:
            out = names[name]
        w.add_tensor(out, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tensors = hf_tensors(CFG)
    return (
        tensors,
        write_hf(root / "hf", CFG, tensors),
        write_gguf(root / "m.gguf", CFG, tensors),
    )


def test_safetensors_and_gguf_load_to_identical_logits(checkpoints):
    tensors, hf_dir, gguf_path = checkpoints
    cfg_h, ph = llama.load_llama_params(hf_dir)
    cfg_g, pg = llama.load_llama_params(gguf_path)
    assert cfg_h == CFG
    assert (cfg_g.num_key_value_heads, cfg_g.tie_word_embeddings) == (2, False)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(f64(a), f64(b), **EXACT), ph, pg
    )
    np.testing.assert_array_equal(  # Flax (in, out) = torch weight transposed
        np.asarray(ph["layers"][1]["self_attn"]["k_proj"]["kernel"]),
        tensors["model.layers.1.self_attn.k_proj.weight"].T,
    )
    ids = jnp.asarray([[1, 5, 9, 3, 0, 7]], jnp.int32)
    lh = llama.load_llama(hf_dir)(ids)
    np.testing.assert_allclose(f64(lh), f64(llama.load_llama(gguf_path)(ids)), **EXACT)
    ref = _reference.llama_logits(ph, CFG, ids)
    # MATMUL_F32 rtol, atol scaled by the logits' magnitude (f32 summation noise).
    tol = dict(rtol=MATMUL_F32["rtol"], atol=MATMUL_F32["rtol"] * np.abs(ref).max())
    np.testing.assert_allclose(f64(lh), ref, **tol)
    scanned = llama.load_llama(gguf_path, scan_layers=True)
    np.testing.assert_allclose(f64(scanned(ids)), ref, **tol)


def test_sharded_hf_checkpoint(tmp_path, checkpoints):
    tensors = checkpoints[0]
    names = sorted(tensors)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG.to_hf()))
    half = len(names) // 2
    io.write_safetensors(d / "a.safetensors", {n: tensors[n] for n in names[:half]})
    io.write_safetensors(d / "b.safetensors", {n: tensors[n] for n in names[half:]})
    wm = {
        n: ("a.safetensors" if i < half else "b.safetensors")
        for i, n in enumerate(names)
    }
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    _, p = llama.load_llama_params(d)
    _, ref = llama.load_llama_params(checkpoints[1])
    assert tree.paths(p) == tree.paths(ref)


def test_tied_head_when_no_output_tensor(tmp_path):
    tied = llama.LlamaConfig.from_hf({**CFG.to_hf(), "tie_word_embeddings": True})
    tensors = hf_tensors(tied)
    assert "lm_head.weight" not in tensors
    c, p = llama.load_llama_params(write_gguf(tmp_path / "t.gguf", tied, tensors))
    assert c.tie_word_embeddings and "lm_head" not in p


def test_shape_mismatch_is_a_clear_error(tmp_path):
    tensors = hf_tensors(CFG)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((31, 24), np.float32)
    with pytest.raises(
        ValueError,
        match=r"'model.layers.1.mlp.up_proj.weight'.*"
        r"layers/1/mlp/up_proj/kernel.*\(24, 31\).*\(24, 32\)",
    ):
        llama.load_llama_params(write_hf(tmp_path / "bad", CFG, tensors))
    tensors = hf_tensors(CFG)
    del tensors["model.norm.weight"]
    with pytest.raises(ValueError, match="lacks parameters.*norm/scale"):
        llama.load_llama_params(write_hf(tmp_path / "missing", CFG, tensors))


def test_unsupported_quant_type_in_checkpoint(tmp_path):
    tensors = hf_tensors(CFG)
    path = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    for name, arr in [("token_embd.weight", tensors["model.embed_tokens.weight"])]:
        w.add_tensor(name, arr)
    w.add_tensor(
        "blk.0.attn_q.weight",
        np.zeros((24, 40), np.uint8),
        raw_dtype=gguf.GGMLQuantizationType.Q8_1,
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        ValueError, match="blk.0.attn_q.weight.*Q8_1.*cannot dequantise"
    ):
        llama.load_llama(path)


def test_missing_files_and_unknown_configs(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        llama.load_llama(tmp_path / "absent.gguf")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        llama.load_llama(tmp_path / "absent_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        llama.load_llama(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CFG.to_hf()))
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickled weights.*never loads"):
        llama.load_llama(tmp_path / "empty")
    d = write_hf(tmp_path / "yarn", CFG, {})
    cfg = {**CFG.to_hf(), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        llama.load_llama(d)
    (d / "config.json").write_text(json.dumps({**CFG.to_hf(), "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        llama.load_llama(d)
    g = write_gguf(
        tmp_path / "ys.gguf",
        CFG,
        hf_tensors(CFG),
        overrides={"llama.rope.scaling.type": "yarn"},
    )
    with pytest.raises(ValueError, match="rope.scaling.type 'yarn'"):
        llama.load_llama(g)


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported general.architecture 'gpt2'"):
        llama.load_llama(path)


def test_hub_id_offline_says_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Offline, pass a local path"):
        llama.load_llama("HuggingFaceTB/SmolLM2-135M-not-cached-here")


def test_split_apply_roundtrip(checkpoints):
    model = llama.load_llama(checkpoints[1])
    g, p = pm.split_params(model)
    ids = jnp.asarray([[2, 4, 6]], jnp.int32)
    np.testing.assert_allclose(f64(pm.apply(g, p, ids)), f64(model(ids)), **EXACT)
    np.testing.assert_allclose(
        f64(pm.rebuild(g, p)(ids)), f64(model(ids)), **EXACT
    )


def test_requested_dtype(checkpoints):
    tensors, hf_dir, gguf_path = checkpoints
    ids = jnp.asarray([[1, 5, 9, 3]], jnp.int32)
    for path in (hf_dir, gguf_path):
        model = llama.load_llama(path, param_dtype=jnp.bfloat16)
        _, p = pm.split_params(model)
        assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}
        ref = f64(llama.load_llama(path)(ids))
        # bf16 weights and activations through 2 layers: BF16 scaled by |logits|.
        np.testing.assert_allclose(
            f64(model(ids)),
            ref,
            rtol=BF16["rtol"],
            atol=4 * BF16["atol"] * np.abs(ref).max(),
        )


def test_qwen2_gguf_with_biases_is_not_permuted(tmp_path):
    cfg = llama.LlamaConfig.from_hf({**CFG.to_hf(), "model_type": "qwen2"})
    assert cfg.attention_bias
    tensors = hf_tensors(cfg)
    rng = np.random.default_rng(5)
    for i in range(cfg.num_hidden_layers):
        for proj, n in (("q", 6), ("k", 2), ("v", 2)):
            tensors[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = (
                rng.standard_normal(n * cfg.dim_head).astype(np.float32)
            )
    hf_dir = write_hf(tmp_path / "qwen", cfg, tensors)
    path = write_gguf(tmp_path / "qwen.gguf", cfg, tensors, arch="qwen2")
    cg, pg = llama.load_llama_params(path)
    ch, ph = llama.load_llama_params(hf_dir)
    assert cg.model_type == "qwen2" and cg.attention_bias
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(f64(a), f64(b), **EXACT), pg, ph
    )
    ids = jnp.asarray([[3, 1, 4, 1, 5]], jnp.int32)
    ref = _reference.llama_logits(ph, ch, ids)
    tol = dict(rtol=MATMUL_F32["rtol"], atol=MATMUL_F32["rtol"] * np.abs(ref).max())
    np.testing.assert_allclose(
        f64(pm.apply(*pm.split_params(llama.load_llama(path)), ids)), ref, **tol
    )


def test_export_to_hf_round_trips(tmp_path, checkpoints):
    tensors, hf_dir, _ = checkpoints
    model = llama.load_llama(hf_dir, scan_layers=True)
    _, params = pm.split_params(model)
    out = llama.save_hf(tmp_path / "export", params, CFG)
    back, _ = io.read_safetensors(out / "model.safetensors")
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value)
    assert (
        llama.LlamaConfig.from_hf(json.loads((out / "config.json").read_text())) == CFG
    )
    assert llama.hf_key_map(CFG)["layers/1/self_attn/q_proj/kernel"] == (
        "model.layers.1.self_attn.q_proj"
    )
