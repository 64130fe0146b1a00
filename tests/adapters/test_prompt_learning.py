"""P-tuning, multitask prompt tuning, CPT and cartridges against PEFT's own tensors.

The PEFT side is tests/io/golden/peft_prompts (scripts/golden/peft_prompts_make.py):
each prompt encoder's state dict (torch names) and the prompt PEFT saved from it.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).parents[1] / "io" / "golden" / "peft_prompts"


def _torch_state(name):
    return {k: jnp.asarray(v) for k, v in io.read_safetensors(
        GOLDEN / f"llama_{name}_encoder.safetensors")[0].items()}


def _saved(name):
    return h.f64(io.read_safetensors(GOLDEN / f"llama_{name}" /
                                     "adapter_model.safetensors")[0]["prompt_embeddings"])


def _count(p):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))


def test_p_tuning_matches_peft_encoders():
    s = _torch_state("p_tuning_mlp")
    mlp = adapters.PTuningMLP(s["embedding.weight"], *(
        s[f"mlp_head.{i}.{w}"].T if w == "weight" else s[f"mlp_head.{i}.{w}"]
        for i in (0, 2, 4) for w in ("weight", "bias")))
    np.testing.assert_allclose(h.f64(adapters.p_tuning_prompt(mlp)), _saved("p_tuning_mlp"),
                               **h.MATMUL_F32)
    s = _torch_state("p_tuning_lstm")

    def layer(i, rev):
        sfx = f"l{i}" + ("_reverse" if rev else "")
        return adapters.LSTMLayer(s[f"lstm_head.weight_ih_{sfx}"].T,
                                  s[f"lstm_head.weight_hh_{sfx}"].T,
                                  s[f"lstm_head.bias_ih_{sfx}"], s[f"lstm_head.bias_hh_{sfx}"])

    lstm = adapters.PTuningLSTM(
        s["embedding.weight"], (layer(0, False), layer(1, False)),
        (layer(0, True), layer(1, True)), s["mlp_head.0.weight"].T, s["mlp_head.0.bias"],
        s["mlp_head.2.weight"].T, s["mlp_head.2.bias"])
    np.testing.assert_allclose(h.f64(adapters.p_tuning_prompt(lstm)),
                               _saved("p_tuning_lstm"), **h.MATMUL_F32)
    # PEFT's prefix projection (tanh MLP) with the same file layout
    s = _torch_state("prefix_projection")
    proj = adapters.PrefixProjection(s["embedding.weight"], s["transform.0.weight"].T,
                                     s["transform.0.bias"], s["transform.2.weight"].T,
                                     s["transform.2.bias"])
    kv = adapters.prefix_kv(proj, num_layers=2, num_kv_heads=2, head_dim=4)
    flat = np.stack([h.f64(kv.keys), h.f64(kv.values)], 1).transpose(2, 0, 1, 3, 4)
    np.testing.assert_allclose(flat.reshape(3, -1), _saved("prefix_projection"),
                               **h.MATMUL_F32)


def test_p_tuning_init_and_counts():
    mlp = adapters.p_tuning(jax.random.key(0), 3, 16, 6)
    lstm = jax.eval_shape(lambda: adapters.p_tuning(jax.random.key(1), 3, 16, 5,
                                                    encoder="lstm", num_layers=2))
    assert (_count(mlp), _count(lstm)) == (304, 1934)  # PEFT's trainable counts
    # torch's inits: U(±1/√fan_in) for Linear weights and biases, N(0, 1) embeddings
    assert np.abs(h.f64(mlp.w1)).max() <= 1 / 4 and np.abs(h.f64(mlp.w3)).max() <= 6 ** -.5
    assert np.abs(h.f64(mlp.b2)).max() <= 6 ** -.5 and h.f64(mlp.embedding).std() > 0.5
    assert lstm.forward[1].w_ih.shape == (10, 20)
    with pytest.raises(ValueError, match="encoder must be"):
        adapters.p_tuning(jax.random.key(0), 3, 16, 6, encoder="gru")


def test_multitask_prompt_per_example_one_trace():
    table = jnp.ones((10, 6))
    p = adapters.multitask_prompt_tuning(jax.random.key(0), 4, table, num_tasks=3, rank=2)
    assert _count(p) == 4 * 6 + 3 * 2 * (4 + 6)
    fn, n = h.count_traces(adapters.multitask_prompt)
    step = jax.jit(fn)
    for ids in ([2, 0], [1, 1], [0, 2]):
        got = step(p, jnp.asarray(ids))
        ref = np.stack([h.f64(p.embeddings) * (h.f64(p.task_cols[t]) @ h.f64(p.task_rows[t]))
                        for t in ids])
        np.testing.assert_allclose(h.f64(got), ref, **h.MATMUL_F32)
    assert n["n"] == 1
    avg = adapters.multitask_prompt_tuning(jax.random.key(1), 4, table, rank=2, source=p)
    np.testing.assert_allclose(h.f64(avg.task_cols[0]), h.f64(p.task_cols).mean(0),
                               **h.MATMUL_F32)
    ex = adapters.multitask_prompt_tuning(jax.random.key(1), 4, table, rank=2, source=p,
                                          source_init="exact", source_task=2)
    np.testing.assert_array_equal(h.f64(ex.task_rows[0]), h.f64(p.task_rows[2]))
    with pytest.raises(ValueError, match="makes one task"):
        adapters.multitask_prompt_tuning(jax.random.key(1), 4, table, num_tasks=2, rank=2,
                                         source=p)


def test_cpt_prompt_projection_gradient_and_loss_match_peft():
    cfg = io.load_peft_prompt(GOLDEN / "llama_cpt").config
    types = cfg["cpt_tokens_type_mask"]
    s = _torch_state("cpt")
    params = adapters.CPTParams(s["embedding.weight"], s["delta_embedding.weight"])
    eps = dict(epsilon=cfg["opt_projection_epsilon"],
               format_epsilon=cfg["opt_projection_format_epsilon"])
    got = adapters.cpt_prompt(params, types, **eps)
    np.testing.assert_allclose(h.f64(got), _saved("cpt"), **h.MATMUL_F32)
    g = jax.grad(lambda d: jnp.sum(adapters.cpt_prompt(params._replace(delta=d), types,
                                                       **eps) * 3.0))(params.delta)
    np.testing.assert_array_equal(h.f64(g)[:, 0], [3, 3, 3, 3, 0, 3, 3])  # label rows frozen
    ref = np.load(GOLDEN / "torch_outputs.npz")
    ids = jnp.asarray(ref["inputs_llama"])
    labels, tmask = adapters.cpt_inputs(ids, jnp.asarray(ref["cpt_input_types"]),
                                        cfg["cpt_token_ids"], types)
    loss = adapters.cpt_loss(jnp.asarray(ref["cpt_logits_with_labels"]), labels, tmask,
                             loss_type=cfg["opt_weighted_loss_type"],
                             decay_factor=cfg["opt_loss_decay_factor"])
    np.testing.assert_allclose(float(loss), float(ref["cpt_loss"]), **h.MATMUL_F32)
    plain = adapters.cpt_loss(jnp.asarray(ref["cpt_logits_with_labels"]), labels, tmask)
    assert abs(float(plain) - float(loss)) > 1e-3  # the decay weighting matters here


def test_cartridge_init_split_and_gradient():
    c = adapters.cartridge(jax.random.key(0), 4, num_layers=2, num_kv_heads=2, head_dim=4)
    assert _count(c.trainable) == 96  # PEFT's count (num_frozen_tokens=1)
    assert c.frozen.keys.shape == (2, 1, 2, 4)
    g = jax.grad(lambda p: jnp.sum(adapters.cartridge_kv(p).keys))(c)
    assert not np.any(h.f64(g.frozen.keys)) and np.all(h.f64(g.trainable.keys) == 1)
    kv = adapters.cartridge_kv(c)
    again = adapters.cartridge(jax.random.key(5), 3, num_layers=2, num_kv_heads=2,
                               head_dim=4, num_frozen=0, init_kv=kv)
    np.testing.assert_array_equal(h.f64(again.trainable.values), h.f64(kv.values)[:, :3])
    both = adapters.cartridge_compose(c, again)
    assert both.frozen.keys.shape[1] == 1 and both.trainable.keys.shape[1] == 6
    with pytest.raises(ValueError, match="init_kv"):
        adapters.cartridge(jax.random.key(0), 4, num_layers=3, num_kv_heads=2, head_dim=4,
                           init_kv=kv)
