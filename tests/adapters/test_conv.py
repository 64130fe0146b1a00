"""adapters.lora_conv: PEFT's conv LoRA golden, float64 reference, init, merge, errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from peftjax import adapters, factored, tree
from tests.helpers import EXACT, f64

G = np.load(os.path.join(os.path.dirname(__file__), "golden", "peft_conv.npz"))
# f32 convolutions against float64 references: each output sums k·in products
# of O(1) terms (up to 36 here), so the absolute error floor is a few 1e-7
# times the output scale (~3); atol 1e-5 covers it with margin, rtol as MATMUL_F32.
CONV_F32 = dict(rtol=1e-5, atol=1e-5)


def np_conv(x, w, stride, pad, dil, groups=1):
    """float64 conv, Flax layout: x (N, *S, C), w (*K, C/g, O), explicit padding."""
    nd = x.ndim - 2
    x = np.pad(x, [(0, 0), *pad, (0, 0)])
    k, cin_g, n_out = w.shape[:nd], w.shape[-2], w.shape[-1]
    sizes = [(x.shape[1 + i] - dil[i] * (k[i] - 1) - 1) // stride[i] + 1
             for i in range(nd)]
    y = np.zeros((x.shape[0], *sizes, n_out))
    og = n_out // groups
    for off in np.ndindex(*k):
        sl = tuple(slice(off[i] * dil[i], off[i] * dil[i] + stride[i] * (sizes[i] - 1) + 1,
                         stride[i]) for i in range(nd))
        xs = x[(slice(None), *sl, slice(None))]
        for g in range(groups):
            y[..., g * og:(g + 1) * og] += (xs[..., g * cin_g:(g + 1) * cin_g]
                                            @ w[off][:, g * og:(g + 1) * og])
    return y


def ref_peft(x, w, bias, a, b, s, stride, pad, dil, groups=1):
    """PEFT's formula in float64: conv(x, W) + s·conv1x1(conv(x, A), B) + bias.

    With groups, A is shared by the groups and B is a grouped 1x1 conv (the
    factoring of LoRA on the grouped kernel, see lora_conv)."""
    x, w, a, b = f64(x), f64(w), f64(a), f64(b)
    nd = w.ndim - 2
    r = a.shape[-1]
    a_k = a.reshape(w.shape[:-1] + (r,))
    z = np_conv(x, np.concatenate([a_k] * groups, axis=-1), stride, pad, dil, groups)
    og, n_out = w.shape[-1] // groups, w.shape[-1]
    branch = np.concatenate([z[..., g * r:(g + 1) * r] @ b[:, g * og:(g + 1) * og]
                             for g in range(groups)], axis=-1)
    y = np_conv(x, w, stride, pad, dil, groups) + s * branch + f64(bias)
    # The identity the merged form rests on: the same as one conv with W + s·ΔW.
    merged = np_conv(x, w + s * (a @ b).reshape(w.shape), stride, pad, dil, groups)
    np.testing.assert_allclose(y, merged + f64(bias), rtol=1e-12, atol=1e-12)
    assert y.shape[-1] == n_out and nd >= 1
    return y


RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
    return jnp.asarray(scale * RNG.standard_normal(shape), jnp.float32)


def _state(params, rank=2, **kw):
    """An assignment on every kernel with non-zero A and B (no jitted init:
    eager random ops compile one by one, which is slow on a loaded machine)."""
    a = tree.assign(params, [tree.Rule(where=".*kernel", then=adapters.lora_conv(rank, **kw))])
    t = {p: adapters.LoRAParams(a=_normal(int(np.prod(w.shape[:-1])), rank, scale=0.3),
                                b=_normal(rank, w.shape[-1], scale=0.3))
         for p, w in ((p, _kernel(params, p)) for p in a)}
    return a, t, {p: None for p in a}


def _kernel(params, path):
    node = params
    for k in path.split("/"):
        node = node[k]
    return node


CASES = [
    # (name, spatial kernel, in, out, stride, pad, dilation, groups, spatial input)
    ("2d_stride", (3, 3), 4, 6, (2, 2), ((1, 1), (1, 1)), (1, 1), 1, (7, 7)),
    ("2d_dilated", (3, 2), 4, 6, (1, 1), ((2, 2), (0, 1)), (2, 1), 1, (6, 5)),
    ("2d_groups", (3, 3), 4, 6, (1, 1), ((1, 1), (1, 1)), (1, 1), 2, (5, 5)),
    ("1d", (3,), 3, 5, (1,), ((1, 1),), (1,), 1, (9,)),
    ("3d", (2, 2, 2), 2, 3, (1, 1, 1), ((0, 0),) * 3, (1, 1, 1), 1, (3, 3, 3)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_factored_and_merged_match_float64_peft_formula(case):
    _, k, cin, cout, stride, pad, dil, groups, sp = case
    conv = nn.Conv(cout, k, strides=stride, padding=pad, kernel_dilation=dil,
                   feature_group_count=groups)
    x = _normal(2, *sp, cin)
    params = {"params": {"kernel": _normal(*k, cin // groups, cout, scale=0.3),
                         "bias": _normal(cout)}}
    a, t, fr = _state(params, spatial_dims=len(k))
    tk = t["params/kernel"]
    want = ref_peft(x, params["params"]["kernel"], params["params"]["bias"], tk.a, tk.b,
                    4.0, stride, pad, dil, groups)  # alpha 8 / r 2
    fac = jax.jit(factored.transform(conv.apply, a, t, fr))(params, x)
    mat = conv.apply(adapters.materialize(a, params, t, fr), x)
    merged = conv.apply(adapters.fold(a, params, t, fr), x)
    for got in (fac, mat, merged):
        np.testing.assert_allclose(f64(got), want, **CONV_F32)
    # Merged and factored agree to f32 rounding of the same sums.
    np.testing.assert_allclose(f64(merged), f64(fac), **CONV_F32)


def _torch_to_flax(n):
    """OI(k...) -> (k...)IO kernels, lora_A (r, in, k...) -> a (k·in, r)."""
    nd = G[f"{n}/weight"].ndim - 2
    to_hwio = tuple(range(2, 2 + nd)) + (1, 0)
    w = G[f"{n}/weight"].transpose(to_hwio)
    a = G[f"{n}/lora_A"].transpose(to_hwio).reshape(-1, G[f"{n}/lora_A"].shape[0])
    b = G[f"{n}/lora_B"].reshape(G[f"{n}/lora_B"].shape[:2]).T
    x = np.moveaxis(G[f"{n}/x"], 1, -1)  # NC... -> N...C
    return w, a, b, x, to_hwio


@pytest.mark.parametrize("name", ["c2", "c1"])
def test_reproduces_peft_golden(name):
    """PEFT 0.21.2's Conv2d/Conv1d LoRA (r=2, alpha=4, B perturbed off zero)."""
    w, a, b, x, to_hwio = _torch_to_flax(name)
    nd = w.ndim - 2
    stride = (2, 2) if name == "c2" else (1,)
    conv = nn.Conv(w.shape[-1], w.shape[:nd], strides=stride, padding=((1, 1),) * nd)
    params = {"params": {"kernel": jnp.asarray(w, jnp.float32),
                         "bias": jnp.asarray(G[f"{name}/bias"], jnp.float32)}}
    ad = adapters.lora_conv(2, alpha=4.0, spatial_dims=nd)
    assign = tree.assign(params, [tree.Rule(where=".*kernel", then=ad)])
    t = {"params/kernel": adapters.LoRAParams(a=jnp.asarray(a, jnp.float32),
                                              b=jnp.asarray(b, jnp.float32))}
    fr = {"params/kernel": None}
    xj = jnp.asarray(x, jnp.float32)
    want = np.moveaxis(G[f"{name}/y_lora"], 1, -1)
    assert np.abs(want - np.moveaxis(G[f"{name}/y_base"], 1, -1)).max() > 0.1
    fac = factored.transform(conv.apply, assign, t, fr)(params, xj)
    mat = conv.apply(adapters.materialize(assign, params, t, fr), xj)
    np.testing.assert_allclose(f64(fac), want, **CONV_F32)
    np.testing.assert_allclose(f64(mat), want, **CONV_F32)
    # PEFT's merge equals ours: delta in weight space (scaling alpha/r = 2 included).
    merged = adapters.fold(assign, params, t, fr)["params"]["kernel"]
    np.testing.assert_allclose(f64(merged) - w, G[f"{name}/delta"].transpose(to_hwio),
                               **CONV_F32)
    np.testing.assert_allclose(float(G[f"{name}/scaling"]), 2.0, **EXACT)


@pytest.mark.parametrize("name", ["c2", "c1"])
def test_init_matches_peft_conventions(name):
    """A kaiming-uniform over fan-in k·in (PEFT's own A lies in that bound), B = 0."""
    w, a_peft, _, _, _ = _torch_to_flax(name)
    nd = w.ndim - 2
    fan_in = int(np.prod(w.shape[:-1]))
    bound = 1.0 / np.sqrt(fan_in)
    assert np.abs(a_peft).max() <= bound
    ad = adapters.lora_conv(2, spatial_dims=nd)
    w_bf16 = jnp.asarray(w, jnp.bfloat16)
    t, f = ad.init(jax.random.key(0), w_bf16)
    merged = ad.apply(w_bf16, t, f)  # identity at init, in the base dtype
    assert merged.dtype == jnp.bfloat16 and t.a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(merged, np.float32),
                                  np.asarray(w_bf16, np.float32))
    assert f is None and t.a.shape == (fan_in, 2) and t.b.shape == (2, w.shape[-1])
    np.testing.assert_array_equal(np.asarray(t.b), 0.0)
    assert np.abs(np.asarray(t.a)).max() <= bound
    assert np.abs(np.asarray(t.a)).max() > 0.5 * bound  # uniform over the full range
    assert adapters.lora_conv(2, spatial_dims=nd).num_trainable(
        jnp.zeros(w.shape)) == 2 * (fan_in + w.shape[-1])


def test_bad_kernels_and_arguments_raise():
    params = {"conv": {"kernel": jnp.zeros((3, 4, 6))}}
    a = tree.assign(params, [tree.Rule(where=".*kernel", then=adapters.lora_conv(2))])
    with pytest.raises(ValueError, match=r"conv/kernel.*4-D conv kernel.*\(3, 4, 6\)"):
        adapters.init(a, jax.random.key(0), params)
    with pytest.raises(ValueError, match="spatial_dims"):
        adapters.lora_conv(2, spatial_dims=0)
    with pytest.raises(ValueError, match="rank"):
        adapters.lora_conv(0)
    with pytest.raises(ValueError, match=r"rank=7 exceeds"):
        adapters.lora_conv(7, spatial_dims=1).init(jax.random.key(0), jnp.zeros((1, 2, 6)))
