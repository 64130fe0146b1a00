"""Mixed precision (``adapters.cast_floating``): casting rules, float32 master
copies, and a bf16 LoRA run that tracks float32."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from peftjax import adapters, data, train, tree
from peftjax import models as pm
from peftjax.models import llama
from tests.helpers import BF16, EXACT
from tests.models.test_llama import make, make_config


def test_cast_floating_casts_floats_only_and_keeps_matches():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    t = {"w": jnp.asarray(w), "norm": {"scale": jnp.ones(4)}, "ids": jnp.arange(3),
         "np": w, "key": jax.random.key(0), "name": "x"}
    out = adapters.cast_floating(t, jnp.bfloat16, keep=r".*norm/scale")
    assert out["w"].dtype == jnp.bfloat16 and out["np"].dtype == jnp.bfloat16
    # round to nearest even, as NumPy's ml_dtypes bfloat16 does
    np.testing.assert_array_equal(np.asarray(out["w"]).view(np.uint16),
                                  w.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert isinstance(out["np"], np.ndarray)
    assert out["norm"]["scale"] is t["norm"]["scale"]  # kept, not copied
    assert out["ids"] is t["ids"] and out["key"] is t["key"] and out["name"] == "x"
    same = adapters.cast_floating(out, jnp.bfloat16)
    assert same["w"] is out["w"]  # already in dtype: no copy


def test_cast_floating_errors():
    t = {"w": jnp.ones(2), "i": jnp.arange(2)}
    with pytest.raises(ValueError, match="dtype=int32 is not a floating dtype"):
        adapters.cast_floating(t, jnp.int32)
    with pytest.raises(ValueError,
                       match=r"keep='.\*bias' matches no floating leaf.*'w'"):
        adapters.cast_floating(t, jnp.bfloat16, keep=r".*bias")
    with pytest.raises(ValueError, match="keep='i' matches no floating leaf"):
        adapters.cast_floating(t, jnp.bfloat16, keep="i")  # an int leaf is not kept
    with pytest.raises(TypeError, match="keep must be a regex string"):
        adapters.cast_floating(t, jnp.bfloat16, keep=["w"])


def test_master_copy_accumulates_updates_bf16_would_drop():
    # 1 + 1e-4 rounds back to 1 in bf16 (half an ulp at 1 is 2^-8 ≈ 3.9e-3);
    # a float32 master copy keeps every update, and its bf16 view moves once
    # the sum crosses half an ulp: 40 updates of 1e-4 give 1.004 -> 1.0078125.
    master = {"w": jnp.ones((), jnp.float32)}
    low = adapters.cast_floating(master, jnp.bfloat16)
    for _ in range(40):
        master = {"w": master["w"] + jnp.float32(1e-4)}
        low = {"w": low["w"] + jnp.bfloat16(1e-4)}
    assert float(low["w"]) == 1.0
    np.testing.assert_allclose(float(master["w"]), 1.004, rtol=1e-6)
    assert float(adapters.cast_floating(master, jnp.bfloat16)["w"]) == 1.0078125
    # the gradient through the cast comes back in float32
    g = jax.grad(lambda m: jnp.sum(adapters.cast_floating(m, jnp.bfloat16)["w"]
                                   .astype(jnp.float32) ** 2))(master)
    assert g["w"].dtype == jnp.float32
    np.testing.assert_allclose(float(g["w"]), 2 * 1.0078125, **EXACT)


def _lora_run(base, g, steps):
    tokens = jnp.asarray(np.tile(np.random.default_rng(0).integers(0, 64, (4, 8)),
                                 (1, 2)), jnp.int32)

    def loss_fn(params, t):
        logits = pm.apply(g, params, t)
        targets, w = data.lm_targets(t, jnp.ones_like(t))
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(nll * w) / jnp.sum(w)

    a = tree.assign(base, [tree.Rule(where=r"layers/self_attn/(q|k|v|o)_proj/kernel",
                                     then=adapters.lora(4, alpha=8.0))])
    trainer = train.trainer(loss_fn, optax.adam(1e-2), adapters=a, factored=False)
    st, losses = trainer.init(jax.random.key(0), base), []
    for _ in range(steps):
        st, m = trainer.step(st, tokens, base)
        losses.append(float(m["loss"]))
    t = st.trainable
    jaxpr = str(jax.make_jaxpr(lambda p: loss_fn(
        adapters.materialize(a, p, t, st.frozen), tokens))(base))
    return t, np.array(losses), jaxpr


def test_bf16_lora_steps_track_float32():
    cfg = make_config(vocab_size=64, hidden_size=32, intermediate_size=64)
    g, p = make(cfg, scan_layers=True)
    t32, l32, _ = _lora_run(p, g, 5)
    # the recipe: bf16 compute dtype in the model, bf16 frozen base
    g16 = pm.split_params(nnx.eval_shape(lambda: llama.LlamaForCausalLM(
        cfg, scan_layers=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))[0]
    low = adapters.cast_floating(p, jnp.bfloat16)
    t16, l16, jaxpr = _lora_run(low, g16, 5)
    # bf16 really ran: the base is bf16, matmuls take bf16 operands, and the
    # trainable factors (hence the Adam moments) stayed float32
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(low))
    assert "dot_general" in jaxpr and "bf16[4,16,32]" in jaxpr
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(t16))
    assert not np.array_equal(l16, l32)
    # Losses: JAX's bf16 tolerance (rtol 1e-2, about 1.3 bf16 ulps of 2^-7);
    # measured relative differences are below 5e-4.
    np.testing.assert_allclose(l16, l32, **BF16)
    assert l16[-1] < l16[0] - 0.5  # and bf16 training does learn
    # The learned updates ΔW = s·A@B agree in direction and size: relative
    # Frobenius error <= 0.3. Adam divides each coordinate by sqrt(v), so the
    # ~2^-8 relative gradient noise of bf16 activations becomes O(1) noise on
    # coordinates whose gradient is near zero; after 5 steps the measured
    # error is 0.02-0.15 per kernel (k_proj, with the smallest gradients, is
    # the largest).
    for path in t32:
        d32, d16 = (np.einsum("lir,lro->lio", np.float64(t[path].a),
                              np.float64(t[path].b)) for t in (t32, t16))
        assert np.linalg.norm(d16 - d32) <= 0.3 * np.linalg.norm(d32), path
