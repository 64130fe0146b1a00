"""peftjax.factored on quantised bases: equal to the float model, no float kernels."""

import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from peftjax import adapters, factored, inits, quant, train, tree
from peftjax.models import apply as llama_apply
from peftjax.models import llama, split_params
from peftjax.tree import _paths
from tests.helpers import MATMUL_F32, assert_tree_allclose, f64


# Tiny Llama: kernels (64,64) q/o, (64,32) k/v, (64,160) gate/up, (160,64) down,
# embedding (200,64); 2 x 5 tokens. No activation has a kernel's element count.
def _cfg(layers):
    return llama.tiny_config(vocab_size=200, intermediate_size=160, num_hidden_layers=layers)


# Q4_1 linear kernels and a Q8_0 embedding blocked along d (as the SmolLM2 GGUF).
QRULES = [tree.Rule(where=r"embed_tokens/embedding", then=quant.q8_0(axis=-1)),
          tree.Rule(where=r".*_proj/kernel", then=quant.q4_1())]
TILE = 1024  # bytes of dequantised weight per tile: 1-4 columns here


def _model(scan, layers):
    cfg = _cfg(layers)
    m = llama.LlamaForCausalLM(cfg, scan_layers=scan, remat=scan, rngs=nnx.Rngs(0))
    g, p = split_params(m)
    qp = quant.quantize_params(p, QRULES)
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, cfg.vocab_size)

    def loss_fn(params, t):
        logits = llama_apply(g, params, t[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], axis=-1))

    return g, qp, quant.dequantize(qp), tokens, loss_fn


def _float_kernel_buffers(compiled, counts):
    """HLO instructions producing a float array with a quantised kernel's size."""
    out = []
    for ln in compiled.as_text().splitlines():
        m = re.search(r"= (f16|bf16|f32|f64)\[([\d,]*)\]", ln)
        if m and " parameter(" not in ln:
            n = math.prod(int(d) for d in m.group(2).split(",") if d)
            if n in counts:
                out.append(ln.strip()[:140])
    return out


def _kernel_counts(qp):
    flat = dict(_paths.flatten(qp, is_leaf=quant.is_quantized))
    counts = set()
    for x in flat.values():
        if quant.is_quantized(x):
            counts.add(x.size)
            if x.ndim == 3:
                counts.add(x.size // x.shape[0])
    return counts


def test_checker_sees_a_dequantised_kernel():
    # The HLO check below can fail: dequantise-then-multiply forms the kernel.
    w = quant.quantize(jax.random.normal(jax.random.key(0), (64, 160)), quant.q4_1())
    x = jnp.ones((10, 64))
    naive = jax.jit(jax.grad(lambda x, w: jnp.sum(x @ quant.dequantize(w)))
                    ).lower(x, w).compile()
    tiled = jax.jit(jax.grad(lambda x, w: jnp.sum(quant.matmul(x, w, tile_bytes=TILE)))
                    ).lower(x, w).compile()
    assert _float_kernel_buffers(naive, {64 * 160})
    assert _float_kernel_buffers(tiled, {64 * 160}) == []


def _run_both(a, t, fr, qp, fp, tokens, loss_fn, *, check_hlo):
    opt = optax.sgd(0.5)

    def q_step(t, o, params, batch):  # factored with small tiles (train.trainer's defaults)
        run = lambda t_: factored.transform(loss_fn, a, t_, fr, tile_bytes=TILE)(params, batch)  # noqa: E731
        loss, g = jax.value_and_grad(run)(t)
        u, o = opt.update(g, o, t)
        return optax.apply_updates(t, u), o, loss

    # Reference: the float model dequantised once, through materialize.
    ref = train.trainer(loss_fn, opt, adapters=a, factored=False, donate=False)
    rs = ref.init(jax.random.key(0), fp, state=adapters.AdapterState(t, fr))
    compiled = jax.jit(q_step).lower(t, opt.init(t), qp, tokens).compile()
    if check_hlo:
        # Neither a float copy of any quantised kernel (per layer or stacked)
        # nor a float tile as large: every dequantisation is a tile.
        assert _float_kernel_buffers(compiled, _kernel_counts(qp)) == []
    tq, oq = t, opt.init(t)
    for _ in range(2):
        tq, oq, lq = compiled(tq, oq, qp, tokens)
        rs, m = ref.step(rs, tokens, fp)
        np.testing.assert_allclose(f64(lq), f64(m["loss"]), **MATMUL_F32)
    assert_tree_allclose(tq, rs.trainable, **MATMUL_F32)
    # The steps moved every adapter (the comparison is not of two no-ops).
    for path in a:
        moved = [float(jnp.max(jnp.abs(x - y))) for x, y in
                 zip(jax.tree.leaves(tq[path]), jax.tree.leaves(t[path]), strict=True)]
        assert max(moved) > 1e-4, path


def test_lora_step_on_quantised_scanned_base_has_no_float_kernel_and_equals_float():
    g, qp, fp, tokens, loss_fn = _model(scan=True, layers=2)
    rule = tree.Rule(where=r"layers/self_attn/(q|k|v|o)_proj/kernel",
                     then=adapters.lora(4, alpha=8.0))
    a = tree.assign(quant.abstract(qp), [rule])
    s = adapters.init(a, jax.random.key(0), quant.abstract(qp))
    # b = 0 at init: move it so that every term carries gradient.
    t = jax.tree.map(lambda x: x + 0.05, s.trainable)
    _run_both(a, t, s.frozen, qp, fp, tokens, loss_fn, check_hlo=True)


def test_dora_and_lora_sb_steps_on_quantised_base_equal_float():
    g, qp, fp, tokens, loss_fn = _model(scan=False, layers=1)
    # DoRA on q, v (its magnitude is initialised from W itself: dequantised).
    a = tree.assign(fp, [tree.Rule(where=r"layers/0/self_attn/(q|v)_proj/kernel",
                                   then=adapters.dora(4, alpha=8.0))])
    s = adapters.init(a, jax.random.key(0), fp)
    t = {p: jax.tree.map(lambda x: x + 0.05, v) for p, v in s.trainable.items()}
    fr = dict(s.frozen)
    # LoRA-SB (a lora_xs state from a gradient sum: any leaf-shaped array; a
    # random one here, inits.accumulate_gradients in practice) on o and down.
    sb = r"layers/0/(self_attn/o_proj|mlp/down_proj)/kernel"
    flat = tree.leaves_by_path(fp)
    stats = {p: jax.random.normal(jax.random.key(i), flat[p].shape)
             for i, p in enumerate(flat) if re.fullmatch(sb, p)}
    plan = tree.assign(fp, [tree.Rule(where=sb, then=inits.lora_sb(
        4, learning_rate=1e-2))])
    res = inits.run(plan, jax.random.key(0), fp, stats=stats)
    a.update(res.assignment)
    t.update(res.state.trainable)
    fr.update(res.state.frozen)
    _run_both(a, t, fr, qp, fp, tokens, loss_fn, check_hlo=False)


def test_quantised_forward_equals_float_and_embedding_rows_are_decoded_alone():
    g, qp, fp, tokens, _ = _model(scan=False, layers=1)

    def fwd(params, t):
        return llama_apply(g, params, t)

    out = jax.jit(factored.transform(fwd, {}, {}, {}, tile_bytes=TILE))(qp, tokens)
    ref = jax.jit(fwd)(fp, tokens)
    np.testing.assert_allclose(f64(out), f64(ref), **MATMUL_F32)
    # The embedding lookup gathers block rows: no float (200, 64) table.
    emb = dict(_paths.flatten(qp, is_leaf=quant.is_quantized))[
        "embed_tokens/embedding"]
    c = jax.jit(factored.transform(lambda p, t: p["embed_tokens"]["embedding"][t] * 2.0,
                               {}, {}, {})).lower(qp, tokens).compile()
    assert _float_kernel_buffers(c, {emb.size}) == []


def test_unsupported_use_dequantises_once_with_a_warning():
    w = jax.random.normal(jax.random.key(0), (64, 6))
    qp = {"w": quant.quantize(w, quant.int8(block_size=32))}

    def f(p, x):
        return jnp.sum(jnp.tanh(p["w"])) + jnp.sum(x @ p["w"]) + jnp.sum(p["w"] ** 2)

    x = jnp.ones((3, 64))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = factored.transform(f, {}, {}, {})(qp, x)
    msgs = [str(r.message) for r in rec
            if issubclass(r.category, factored.FactoredFallbackWarning)]
    assert len(msgs) == 1 and "'w'" in msgs[0] and "quantised kernel" in msgs[0]
    wd = f64(quant.dequantize(qp["w"]))
    want = np.tanh(wd).sum() + (np.ones((3, 64)) @ wd).sum() + (wd ** 2).sum()
    np.testing.assert_allclose(f64(got), want, **MATMUL_F32)


def test_adapter_on_another_axis_than_the_blocks_names_the_leaf():
    w = quant.quantize(jnp.ones((64, 32)), quant.int8(block_size=32, axis=-1))
    params = {"w": w}
    dn = tree.DimensionNumbers(reduction_axis=0, output_axis=1)
    a = {"w": adapters.lora(2, dimension_numbers=dn)}
    s = adapters.init(a, jax.random.key(0), quant.abstract(params))
    with pytest.raises(ValueError, match=r"'w'.*\(64, 32\).*axis 1"):
        factored.transform(lambda p, x: x @ p["w"], a, *s)(params, jnp.ones((2, 64)))
