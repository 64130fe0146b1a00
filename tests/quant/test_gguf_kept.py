"""GGUF checkpoints kept quantised: the file's blocks equal the dequantised model."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import factored, io, quant, tree
from peftjax import models as pm
from peftjax.models import llama
from peftjax.tree import _paths
from tests.helpers import ELEMENTWISE_F32, f64
from tests.models.test_llama_loader import hf_tensors, llama_cpp_permute

# Every matrix a multiple of 32 along its input axis (GGUF blocks of 32).
CFG = llama.tiny_config(vocab_size=40, intermediate_size=96, tie_word_embeddings=False)


def _raw(q):
    """A kept tensor's blocks back as GGUF bytes ``(rows, nb * type_size)``."""
    b = jax.tree.map(np.asarray, q.blocks)
    parts = [b.d[..., None].view(np.uint8)]
    if isinstance(b, quant.Q4_1Blocks):
        parts.append(b.m[..., None].view(np.uint8))
    parts.append(b.qs.view(np.uint8))
    cat = np.concatenate(parts, axis=-1)
    return cat.reshape(cat.shape[:-2] + (-1,))


_GGUF_NAMES = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
               "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight":
               "attn_output", "mlp.gate_proj.weight": "ffn_gate",
               "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
               "input_layernorm.weight": "attn_norm",
               "post_attention_layernorm.weight": "ffn_norm"}


def _write_quantised_gguf(path, cfg, tensors):
    """llama.cpp's layout: Q/K rows permuted, then Q8_0 embedding/head, Q4_1 rest."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight":
           "output_norm", "lm_head.weight": "output"}
    for name, arr in tensors.items():
        if name in top:
            out = top[name]
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            out = f"blk.{i}.{_GGUF_NAMES[rest]}"
            if rest.startswith("self_attn.q_proj"):
                arr = llama_cpp_permute(arr, cfg.num_attention_heads)
            elif rest.startswith("self_attn.k_proj"):
                arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        if arr.ndim == 2:
            qt = (gguf.GGMLQuantizationType.Q8_0 if name in top
                  else gguf.GGMLQuantizationType.Q4_1)
            w.add_tensor(out + ".weight", gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(out + ".weight", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_kept_quantised_equals_its_dequantised_load(tmp_path):
    path = _write_quantised_gguf(tmp_path / "q.gguf", CFG, hf_tensors(CFG))
    types = io.read_gguf(path).tensor_types
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["output.weight"] == "Q8_0"
    cfg, fp = llama.load_llama_params(path)
    cfg_q, qp = llama.load_llama_params(path, keep_quantized=True)
    assert cfg_q == cfg
    flat_q = dict(_paths.flatten(qp, is_leaf=quant.is_quantized))
    flat_f = tree.leaves_by_path(fp)
    assert sorted(flat_q) == sorted(flat_f)
    n_quant = 0
    for p, x in flat_q.items():
        if x.ndim == 2:
            assert quant.is_quantized(x), p
            n_quant += 1
            x = quant.dequantize(x)
        # The values of gguf's own dequantisation (transposed, Q/K unpermuted).
        np.testing.assert_allclose(f64(x), f64(flat_f[p]), **ELEMENTWISE_F32)
    assert n_quant == 2 + 7 * CFG.num_hidden_layers


def test_keep_quantized_is_for_gguf_only(tmp_path):
    with pytest.raises(ValueError, match="keep_quantized.*quantize_params"):
        llama.load_llama_params(tmp_path, keep_quantized=True)


@pytest.mark.slow
def test_smollm2_kept_quantised_logits_equal_the_dequantised_model():
    """The real Q4_1/Q8_0 checkpoint, kept as its blocks, against gguf's float."""
    kept = io.read_gguf(pm.smollm2_gguf(), keep_quantized=True)
    assert {kept.tensor_types[n] for n, t in kept.tensors.items()
            if quant.is_quantized(t)} == {"Q4_1", "Q8_0"}
    # The reference: the same file dequantised by the gguf package.
    floats = {n: gguf.quants.dequantize(_raw(t), getattr(
        gguf.GGMLQuantizationType, kept.tensor_types[n])) if quant.is_quantized(t)
        else t for n, t in kept.tensors.items()}
    cfg, fp = llama.params_from_gguf(io.GGUFFile(kept.metadata, floats,
                                                 kept.tensor_types))
    del floats
    _, qp = llama.params_from_gguf(kept)
    del kept
    qp, fp = tree.stack_layers(qp), tree.stack_layers(fp)
    assert quant.nbytes(qp) <= 0.3 * quant.nbytes(fp)
    g = nnx.graphdef(nnx.eval_shape(lambda: llama.LlamaForCausalLM(
        cfg, scan_layers=True, rngs=nnx.Rngs(0))))
    ids = jnp.asarray([[1, 504, 3458, 282, 253, 1345, 30, 216]], jnp.int32)

    def fwd(p, t):
        return pm.apply(g, p, t)

    ref = f64(jax.jit(fwd)(fp, ids))
    del fp
    out = f64(jax.jit(factored.transform(fwd, {}, {}, {}))(qp, ids))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
