"""The factored convolution: gradients, no kernel-sized terms, FLOPs, CNNs end to end."""

import pathlib
import re
import warnings

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from peftjax import adapters, factored, train, tree
from tests.helpers import GRAD_F32, assert_tree_allclose

# f32 convolutions: sums of up to k·in = 72 products of O(1) terms (see
# tests/adapters/test_conv.py), so atol 1e-5 rather than MATMUL_F32's 1e-6.
CONV_F32 = dict(rtol=1e-5, atol=1e-5)
RNG = np.random.default_rng(1)


def _normal(*shape, scale=1.0):
    return jnp.asarray(scale * RNG.standard_normal(shape), jnp.float32)


def _lora_state(params, paths, rank=2, adapter=None):
    a = tree.assign(params, [tree.Rule(where=p, then=adapter or adapters.lora_conv(
        rank, spatial_dims=len(w.shape) - 2)) for p, w in paths.items()])
    t = {p: adapters.LoRAParams(a=_normal(int(np.prod(w.shape[:-1])), rank, scale=0.3),
                                b=_normal(rank, w.shape[-1], scale=0.3))
         for p, w in paths.items()}
    return a, t, {p: None for p in paths}


CONVS = {  # (layer, input shape, feature groups)
    "2d_groups_stride": (nn.Conv(6, (3, 3), strides=2, padding="SAME",
                                 feature_group_count=2), (2, 7, 7, 4), 2),
    "2d_dilated": (nn.Conv(5, (3, 3), kernel_dilation=2, padding="SAME"), (2, 7, 6, 3), 1),
    "1d": (nn.Conv(5, (3,), padding="VALID"), (2, 9, 3), 1),
    # lhs (input) dilation by the strides, the kernel unflipped.
    "2d_transpose": (nn.ConvTranspose(5, (3, 3), strides=(2, 2)), (2, 4, 4, 3), 1),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_grads_wrt_a_b_equal_materialize(name):
    conv, x_shape, groups = CONVS[name]
    x = _normal(*x_shape)
    nd = len(x_shape) - 2
    cin = x_shape[-1] // groups
    params = {"params": {"kernel": _normal(*conv.kernel_size, cin, conv.features, scale=0.3),
                         "bias": _normal(conv.features)}}
    a, t, fr = _lora_state(params, {"params/kernel": params["params"]["kernel"]})
    assert nd == len(conv.kernel_size)

    def loss_mat(t):
        return jnp.sum(jnp.tanh(conv.apply(adapters.materialize(a, params, t, fr), x)) ** 2)

    def loss_fac(t):
        return jnp.sum(jnp.tanh(factored.transform(conv.apply, a, t, fr)(params, x)) ** 2)

    v_f, g_f = jax.jit(jax.value_and_grad(loss_fac))(t)
    v_m, g_m = jax.jit(jax.value_and_grad(loss_mat))(t)
    np.testing.assert_allclose(float(v_f), float(v_m), rtol=1e-5)
    assert_tree_allclose(g_f, g_m, **GRAD_F32)
    assert float(jnp.abs(g_f["params/kernel"].a).max()) > 1e-2  # not a trivial zero


def _kernel_shaped(jaxpr, shapes):
    """Equations (recursively) that compute an array of a kernel's or its matrix's
    shape; reshapes/transposes (free views of the frozen base) do not count."""
    found = []
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            if tuple(v.aval.shape) in shapes and eqn.primitive.name not in (
                    "reshape", "transpose"):
                found.append((eqn.primitive.name, tuple(v.aval.shape)))
        for sub in jex.core.jaxprs_in_params(eqn.params):
            found += _kernel_shaped(sub, shapes)
    return found


def _single_conv(n=4, hw=16, cin=16, cout=32, rank=4):
    """Loss functions of ``(t, params, x)``: params and x are arguments, not
    constants XLA could fold (that would drop the base conv from the count)."""
    conv = nn.Conv(cout, (3, 3), padding="SAME")
    x = _normal(n, hw, hw, cin)
    params = {"params": {"kernel": _normal(3, 3, cin, cout, scale=0.1),
                         "bias": _normal(cout)}}
    a, t, fr = _lora_state(params, {"params/kernel": params["params"]["kernel"]},
                           rank=rank)

    def fac(t, params, x):
        return jnp.sum(factored.transform(conv.apply, a, t, fr)(params, x) ** 2)

    def mat(t, params, x):
        return jnp.sum(conv.apply(adapters.materialize(a, params, t, fr), x) ** 2)

    return fac, mat, (t, params, x), (3, 3, cin, cout)


def test_factored_grad_forms_no_kernel_sized_array_and_costs_fewer_flops():
    fac, mat, args, shape = _single_conv()
    shapes = {shape, (int(np.prod(shape[:-1])), shape[-1])}
    assert _kernel_shaped(jax.make_jaxpr(jax.grad(fac))(*args).jaxpr, shapes) == []
    assert _kernel_shaped(jax.make_jaxpr(jax.grad(mat))(*args).jaxpr, shapes)  # W', dW'
    f_fac = jax.jit(jax.grad(fac)).lower(*args).compile().cost_analysis()["flops"]
    f_mat = jax.jit(jax.grad(mat)).lower(*args).compile().cost_analysis()["flops"]
    # r=4 of out=32: the adapter branch and its two weight gradients cost about
    # r/out of the base conv each; materialize pays a full kernel gradient
    # (measured 0.67 of materialize's FLOPs).
    assert f_fac < 0.8 * f_mat, (f_fac, f_mat)


def test_plain_lora_with_conv_view_falls_back_loudly_and_exactly():
    conv, x_shape, _ = CONVS["1d"]
    x = _normal(*x_shape)
    params = {"params": {"kernel": _normal(3, 3, 5, scale=0.3), "bias": _normal(5)}}
    dn = tree.DimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    a, t, fr = _lora_state(params, {"params/kernel": params["params"]["kernel"]},
                           adapter=adapters.lora(2, dimension_numbers=dn))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = factored.transform(conv.apply, a, t, fr)(params, x)
    msgs = [str(m.message) for m in w if issubclass(m.category, factored.FactoredFallbackWarning)]
    assert len(msgs) == 1 and "params/kernel" in msgs[0] and "lora_conv" in msgs[0]
    want = conv.apply(adapters.materialize(a, params, t, fr), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **CONV_F32)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="c1")(x))
        x = jax.nn.relu(nn.Conv(8, (3, 3), strides=2, feature_group_count=2,
                                name="c2")(x))
        x = nn.Conv(4, (3,), padding="SAME", name="c3")(x.reshape(x.shape[0], -1, 8))
        return nn.Dense(3, name="head")(x.mean(axis=1))


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(6, 8, (3, 3), strides=2, feature_group_count=2, rngs=rngs)
        self.c3 = nnx.Conv(8, 4, (3,), rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.c1(x))
        x = jax.nn.relu(self.c2(x))
        x = self.c3(x.reshape(x.shape[0], -1, 8))
        return self.head(x.mean(axis=1))


def _fill(shapes):
    """Random values for an abstract tree (no eager init: each eager op compiles,
    which takes tens of seconds on a loaded two-core machine)."""
    return jax.tree.map(lambda s: _normal(*s.shape, scale=0.3), shapes)


def _cnn(kind):
    x = _normal(2, 6, 6, 4)
    if kind == "linen":
        model = LinenCNN()
        params = _fill(jax.eval_shape(model.init, jax.random.key(0), x))
        apply_fn, prefix = model.apply, "params/"
    else:
        abstract = nnx.eval_shape(lambda: NNXCNN(nnx.Rngs(0)))
        g, state = nnx.split(abstract, nnx.Param)
        params = _fill(nnx.to_pure_dict(state))
        apply_fn, prefix = (lambda p, x: nnx.merge(g, p)(x)), ""
    return apply_fn, params, x, prefix


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_cnn_factored_train_step_equals_materialize_step(kind):
    apply_fn, params, x, prefix = _cnn(kind)
    labels = jnp.array([0, 2])
    rules = [tree.Rule(where=f"{prefix}c(1|2)/kernel", then=adapters.lora_conv(2)),
             tree.Rule(where=f"{prefix}c3/kernel",
                       then=adapters.lora_conv(2, spatial_dims=1)),
             tree.Rule(where=f"{prefix}head/kernel", then=adapters.lora(2))]
    a = tree.assign(params, rules)
    state = jax.eval_shape(lambda p: adapters.init(a, jax.random.key(0), p), params)
    # Random A and B (B off zero) so that every gradient (dA too) is non-trivial.
    t = _fill(state.trainable)

    def loss_fn(p, batch):
        logits = apply_fn(p, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    out = {}
    for path in ("factored", "materialize"):
        tr = train.trainer(loss_fn, optax.sgd(0.5), adapters=a,
                           factored=path == "factored", donate=False)
        s = tr.init(jax.random.key(0), params,
                    state=adapters.AdapterState(t, state.frozen))
        s, m = tr.step(s, (x, labels), params)
        out[path] = (s.trainable, m["loss"])
    (t_f, loss_f), (t_m, loss_m) = out["factored"], out["materialize"]
    np.testing.assert_allclose(float(loss_f), float(loss_m), rtol=1e-5)
    assert_tree_allclose(t_f, t_m, **GRAD_F32)
    moved = jax.tree.map(lambda u, v: float(jnp.abs(u - v).max()), t_f, t)
    assert min(jax.tree.leaves(moved)) > 1e-4, moved


def test_docs_conv_lora_example_runs():
    """The example of docs/conv_lora.md runs as written, on the factored path."""
    path = pathlib.Path(__file__).resolve().parents[2] / "docs" / "conv_lora.md"
    blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"),
                        re.S | re.M)
    assert len(blocks) == 1
    scope: dict = {}
    with jax.numpy_dtype_promotion("standard"):  # a user's default setting
        exec(compile(blocks[0], "docs/conv_lora.md", "exec"), scope)
    assert np.isfinite(float(scope["loss"]))
    assert scope["merged"]["params"]["conv1"]["kernel"].shape == (3, 3, 3, 8)


def test_dropout_acts_on_the_adapter_branch_only():
    conv, x_shape, _ = CONVS["1d"]
    x = _normal(*x_shape)
    params = {"params": {"kernel": _normal(3, 3, 5, scale=0.3), "bias": _normal(5)}}
    a, t, fr = _lora_state(params, {"params/kernel": params["params"]["kernel"]},
                           adapter=adapters.lora_conv(2, spatial_dims=1, dropout=0.5))
    key = jax.random.key(7)

    def run(t, **kw):
        return jax.jit(factored.transform(conv.apply, a, t, fr, **kw))(params, x)

    det = run(t, deterministic=True)
    want = conv.apply(adapters.materialize(a, params, t, fr, deterministic=True), x)
    np.testing.assert_allclose(np.asarray(det), np.asarray(want), **CONV_F32)
    dropped = run(t, key=key)
    assert float(jnp.abs(dropped - det).max()) > 1e-2  # the branch sees dropout(x)
    np.testing.assert_array_equal(np.asarray(run(t, key=key)), np.asarray(dropped))
    zero_b = {p: v._replace(b=jnp.zeros_like(v.b)) for p, v in t.items()}
    np.testing.assert_allclose(np.asarray(run(zero_b, key=key)),
                               np.asarray(conv.apply(params, x)), **CONV_F32)
