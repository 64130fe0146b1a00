"""The jaxpr transform: control flow, views, fallbacks and compiled cost."""

import re
import warnings

import jax
import jax.numpy as jnp
import pytest

from peftjax import adapters, factored, tree
from tests.helpers import GRAD_F32, MATMUL_F32, assert_tree_allclose


def _lora_state(params, where, **kw):
    a = tree.assign(params, [tree.Rule(where=where, then=adapters.lora(2, **kw))])
    s = adapters.init(a, jax.random.key(0), params)
    t = jax.tree.map(lambda x: x + 0.1, s.trainable)
    return a, t, s.frozen


def _check(f, params, where, *args, **kw):
    a, t, fr = _lora_state(params, where, **kw)

    def ref(t):
        return f(adapters.materialize(a, params, t, fr), *args)

    def fac(t):
        return factored.transform(f, a, t, fr)(params, *args)

    assert_tree_allclose(jax.jit(fac)(t), ref(t), **MATMUL_F32)
    assert_tree_allclose(jax.jit(jax.grad(fac))(t), jax.grad(ref)(t), **GRAD_F32)


@jax.custom_vjp
def _cvjp(x, w):
    return x @ w


_cvjp.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))


@jax.custom_jvp
def _cjvp(x, w):
    return x @ w


_cjvp.defjvp(lambda p, t: (p[0] @ p[1], t[0] @ p[1] + p[0] @ t[1]))


def test_control_flow_and_views():
    key = jax.random.key(3)
    params = {"w": jax.random.normal(key, (4, 6)), "v": jax.random.normal(key, (6, 4)),
              "heads": jax.random.normal(key, (4, 2, 3))}
    x = jax.random.normal(jax.random.key(4), (3, 4))

    def f(p, x):
        h = jax.jit(lambda x, w: jnp.einsum("bi,io->bo", x, w))(x, p["w"])
        h = jax.lax.cond(h[0, 0] > 0, lambda h: h @ p["v"], lambda h: -(h @ p["v"]), h)
        h = _cvjp(h, p["w"]) + _cjvp(h, p["w"])
        h = jax.checkpoint(lambda h, w: jnp.tanh(h @ w.T))(h, p["v"].T)  # transposes
        h = jax.lax.fori_loop(0, 2, lambda i, c: jnp.tanh(c @ p["w"]) @ p["v"], h)
        heads = jnp.einsum("bi,ihd->bhd", h, p["heads"])  # head-split view
        flat = h @ p["heads"].reshape(4, 6)                # merged view
        return jnp.sum(heads ** 2) + jnp.sum(flat ** 2)

    dn = tree.DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    a = tree.assign(params, [tree.Rule(where="w|v", then=adapters.lora(2)),
                             tree.Rule(where="heads",
                                       then=adapters.lora(2, dimension_numbers=dn))])
    s = adapters.init(a, jax.random.key(0), params)
    t = jax.tree.map(lambda x: x + 0.1, s.trainable)

    def ref(t):
        return f(adapters.materialize(a, params, t, s.frozen), x)

    def fac(t):
        return factored.transform(f, a, t, s.frozen)(params, x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every use above is handled
        got, g = jax.jit(jax.value_and_grad(fac))(t)
    assert_tree_allclose(got, ref(t), **MATMUL_F32)
    assert_tree_allclose(g, jax.grad(ref)(t), **GRAD_F32)


def test_output_map_through_views():
    """RoAd's out_map on a transposed use (the kernel as lhs) and a head-split
    output: values and gradients as materialised, one base product each."""
    ks = jax.random.split(jax.random.key(5), 3)
    params = {"w": jax.random.normal(ks[0], (4, 6)),
              "heads": jax.random.normal(ks[1], (6, 2, 4))}
    x = jax.random.normal(ks[2], (3, 4))

    def f(p, x):
        h = jnp.einsum("oi,bi->ob", p["w"].T, x).T           # the kernel as lhs
        return jnp.sum(jnp.einsum("bi,ihd->bhd", h, p["heads"]) ** 2)  # split output

    dn = tree.DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    a = tree.assign(params, [
        tree.Rule(where="w", then=adapters.road("road_4", group_size=2)),
        tree.Rule(where="heads", then=adapters.road(group_size=4, dimension_numbers=dn))])
    s = adapters.init(a, jax.random.key(0), params)
    t = {p: adapters.RoAdParams(v.theta + jnp.linspace(-1.0, 1.0, v.theta.size),
                                v.alpha * jnp.linspace(0.7, 1.3, v.alpha.size))
         for p, v in s.trainable.items()}

    def ref(t):
        return f(adapters.materialize(a, params, t, s.frozen), x)

    def fac(t):
        return factored.transform(f, a, t, s.frozen)(params, x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every use above is handled
        got, g = jax.jit(jax.value_and_grad(fac))(t)
    want, g_want = jax.jit(jax.value_and_grad(ref))(t)
    assert_tree_allclose(got, want, **MATMUL_F32)
    assert_tree_allclose(g, g_want, **GRAD_F32)
    jaxpr = str(jax.make_jaxpr(fac)(t))
    assert jaxpr.count("dot_general") == 2  # no R·W, no second base product


def test_while_loop_forward():
    params = {"w": jax.random.normal(jax.random.key(0), (4, 4))}
    x = jax.random.normal(jax.random.key(1), (2, 4))

    def f(p, x):
        return jax.lax.while_loop(lambda c: c[0] < x.shape[0] + 1,
                                  lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])),
                                  (0, x))[1]

    a, t, fr = _lora_state(params, "w")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(factored.transform(f, a, t, fr))(params, x)
    assert_tree_allclose(got, f(adapters.materialize(a, params, t, fr), x), **MATMUL_F32)


def test_layer_indexing_of_a_stacked_kernel():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 4, 4))}
    x = jax.random.normal(jax.random.key(1), (2, 4))

    def f(p, x):
        for i in range(3):
            x = jnp.tanh(x @ p["w"][i])
        return jnp.sum(x ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(f, params, "w", x, dimension_numbers=tree.dims.stacked())


def test_unhandled_use_is_materialised_with_one_warning_naming_the_path():
    params = {"blk": {"w": jax.random.normal(jax.random.key(0), (4, 4))}}
    x = jax.random.normal(jax.random.key(1), (2, 4))

    def f(p, x):
        w = p["blk"]["w"]
        return jnp.sum((x @ w) ** 2) + jnp.linalg.norm(w) + jnp.sum(w * 2.0)

    with pytest.warns(factored.FactoredFallbackWarning) as record:
        _check(f, params, "blk/w", x)
    msgs = [str(r.message) for r in record]
    # One per traced call (_check traces the factored function twice).
    assert len(msgs) == 2
    assert all(re.search(r"'blk/w'", m) for m in msgs)


def _hlo_step(mode):
    """A small MLP step (tokens 64, kernels 96x128) for compiled checks."""
    params = {"l0": {"kernel": jax.random.normal(jax.random.key(0), (96, 128))},
              "l1": {"kernel": jax.random.normal(jax.random.key(1), (128, 96))}}
    x = jax.random.normal(jax.random.key(2), (64, 96))
    a = tree.assign(params, [tree.Rule(where=r"l\d/kernel", then=adapters.lora(4))])
    s = adapters.init(a, jax.random.key(0), params)

    def loss(p, x):
        return jnp.mean(jnp.tanh(x @ p["l0"]["kernel"]) @ p["l1"]["kernel"])

    def step(t, params, x):  # params and x are arguments: no constant folding
        if mode == "factored":
            return jax.grad(lambda t: factored.transform(loss, a, t, s.frozen)(params, x))(t)
        return jax.grad(lambda t: loss(adapters.materialize(a, params, t, s.frozen), x))(t)

    return jax.jit(step).lower(s.trainable, params, x).compile()


def test_factored_step_has_no_kernel_sized_temporaries_and_fewer_flops():
    fac, mat = _hlo_step("factored"), _hlo_step("materialize")
    shapes = [r"f32\[96,128\]", r"f32\[128,96\]"]

    def kernel_sized(c):
        # Instructions (not parameters) producing a kernel-shaped array.
        return [ln for ln in c.as_text().splitlines()
                if any(re.search(r"= " + sh + r"\{?", ln) for sh in shapes)
                and " parameter(" not in ln]

    assert kernel_sized(mat), "materialize should form W + s·A@B"
    assert kernel_sized(fac) == []
    f_fac = fac.cost_analysis()["flops"]
    f_mat = mat.cost_analysis()["flops"]
    # Materialize pays x^T·dy for each adapted matrix (2·tokens·in·out) and
    # forms A@B (2·in·r·out); the factored step pays neither.
    saving = 2 * 64 * 96 * 128 * 2
    assert f_fac < f_mat
    assert abs((f_mat - f_fac) - saving) / saving < 0.05, (f_mat, f_fac)
