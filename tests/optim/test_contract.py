"""Transform contract suite (docs/architecture.md#tests), parametrized over every transform."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import optim
from tests.helpers import BF16, ELEMENTWISE_F32, EXACT, MATMUL_F32, assert_tree_allclose, f64


def _matrix_params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    n = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, dtype)  # noqa: E731
    return {"w": n(6, 8), "layers": {"stack": n(2, 4, 6)}, "bias": n(8)}  # scanned layout


def _adapter_params(dtype=jnp.float32):
    rng = np.random.default_rng(1)
    n = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, dtype)  # noqa: E731
    return {"q/kernel": {"a": n(6, 2), "b": n(2, 8)}}


def _pair_params(dtype=jnp.float32):
    # "bias" sorts first: the partition test freezes it and keeps the a/b pair.
    rng = np.random.default_rng(5)
    n = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, dtype)  # noqa: E731
    return {"bias": n(8), "q/kernel": {"a": n(6, 2), "b": n(2, 8)}}


def _layer_params(dtype=jnp.float32):
    rng = np.random.default_rng(2)
    n = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, dtype)  # noqa: E731
    return {"embed": n(5, 3), "layers": {str(i): {"w": n(3, 3)} for i in range(3)}}


def _gated_params(dtype=jnp.float32):
    rng = np.random.default_rng(4)
    n = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, dtype)  # noqa: E731
    return {"q/kernel": {"a": n(6, 2), "b": n(2, 8), "gate": n(2)}}


def sora_sgd(learning_rate, lambda_, *, gate_name="gate"):
    """SoRA's recipe: the optimizer's step, then the proximal step on the gates."""
    return optax.chain(optax.sgd(learning_rate),
                       optim.scale_by_sora(learning_rate, lambda_, gate_name=gate_name))


HF = optim.scale_by_adam_hf()
# (name, factory, kwargs, static_args, params factory)
TRANSFORMS = [
    ("galore", optim.galore,
     dict(learning_rate=0.05, rank=2, update_proj_gap=3, scale=0.5, inner=HF),
     ("rank", "update_proj_gap", "proj_type", "inner", "projector",
      "dimension_numbers", "stagger", "key"), _matrix_params),
    ("galore_staggered_randomized", optim.galore,
     dict(learning_rate=0.05, rank=2, update_proj_gap=3, inner=HF, stagger=True,
          projector=optim.randomized_svd(1, 1)),
     ("rank", "update_proj_gap", "proj_type", "inner", "projector",
      "dimension_numbers", "stagger", "key"), _matrix_params),
    ("frugal_svd", optim.frugal,
     dict(learning_rate=0.05, density=0.5, update_gap=3, inner=HF, free_scale=0.5),
     ("density", "update_gap", "projector", "proj_type", "inner", "free",
      "reset_statistics", "dimension_numbers", "key"), _matrix_params),
    ("frugal_columns", optim.frugal,
     dict(learning_rate=0.05, density=0.5, update_gap=3, inner=HF,
          projector=optim.coordinates(), proj_type="right"),
     ("density", "update_gap", "projector", "proj_type", "inner", "free",
      "reset_statistics", "dimension_numbers", "key"), _matrix_params),
    ("frugal_blocks", optim.frugal,
     dict(learning_rate=0.05, density=0.5, update_gap=3, inner=HF,
          projector=optim.blocks("ascending")),
     ("density", "update_gap", "projector", "proj_type", "inner", "free",
      "reset_statistics", "dimension_numbers", "key"), _matrix_params),
    ("lisa_keep", optim.lisa,
     dict(learning_rate=0.05, n_layers=3, n_active=1, interval=2, inner=HF),
     ("n_layers", "n_active", "interval", "layers", "stacked", "state_policy",
      "inner", "key"), _layer_params),
    ("loraplus", optim.loraplus,
     dict(learning_rate=0.05, ratio=4.0, inner=HF), ("inner",), _adapter_params),
    ("lorafa", optim.lorafa,
     dict(learning_rate=0.05, scaling=2.0, weight_decay=0.01), ("projection_dtype",),
     _pair_params),
    ("riemannian", optim.riemannian,
     dict(learning_rate=0.05, reg=0.01, weight_decay=0.01), ("inner",), _pair_params),
    ("scale_by_sora", sora_sgd,
     dict(learning_rate=0.05, lambda_=0.5), ("gate_name",), _gated_params),
    ("sora", optim.sora,
     dict(learning_rate=0.05, lambda_=0.5, weight_decay=0.01), ("gate_name",),
     _gated_params),
    ("adamw_hf", optim.adamw_hf,
     dict(learning_rate=0.05, weight_decay=0.01), (), _matrix_params),
    ("osf", optim.osf,
     dict(learning_rate=0.05, effective_rank=1, inner=HF),
     ("effective_rank", "inner", "dimension_numbers"), _matrix_params),
]
IDS = [t[0] for t in TRANSFORMS]


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's own wrappers (inject_hyperparams, MultiSteps) mix weak floats.
    with jax.numpy_dtype_promotion("standard"):
        yield


def _grads(params, steps, seed=3):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                         params) for _ in range(steps)]


def _run(tx, params, grads, **extra):
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))
    outs = []
    for g in grads:
        u, state = update(g, state, params)
        outs.append(u)
    return outs, state


@pytest.mark.parametrize("name, factory, kwargs, static, make", TRANSFORMS, ids=IDS)
def test_chain_partition_and_extra_args(name, factory, kwargs, static, make):
    params = make()
    first = jax.tree.leaves(params)[0]
    labels = jax.tree.map(lambda x: "frozen" if x is first else "m", params)
    tx = optax.chain(
        optax.partition({"m": factory(**kwargs), "frozen": optax.set_to_zero()},
                        labels),
        optax.clip_by_global_norm(10.0),
    )
    grads = _grads(params, 3)
    outs, _ = _run(tx, params, grads, unused_extra=1.0)
    for u in outs:
        np.testing.assert_array_equal(f64(jax.tree.leaves(u)[0]), 0.0)
        assert any(np.any(f64(x) != 0) for x in jax.tree.leaves(u)[1:])


@pytest.mark.parametrize("name, factory, kwargs, static, make", TRANSFORMS, ids=IDS)
def test_inject_hyperparams_matches_plain(name, factory, kwargs, static, make):
    params = make()
    grads = _grads(params, 4)
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    a, state = _run(injected, params, grads)
    b, _ = _run(factory(**kwargs), params, grads)
    assert_tree_allclose(a, b, **MATMUL_F32)
    np.testing.assert_allclose(float(state.hyperparams["learning_rate"]),
                               kwargs["learning_rate"], **ELEMENTWISE_F32)


@pytest.mark.parametrize("name, factory, kwargs, static, make", TRANSFORMS, ids=IDS)
def test_multisteps_accumulates(name, factory, kwargs, static, make):
    params = make()
    grads = _grads(params, 4)
    tx = optax.MultiSteps(factory(**kwargs), every_k_schedule=2)
    outs, _ = _run(tx, params, grads)
    for k, u in enumerate(outs):
        nonzero = any(np.any(f64(x) != 0) for x in jax.tree.leaves(u))
        assert nonzero == (k % 2 == 1)


@pytest.mark.parametrize("name, factory, kwargs, static, make", TRANSFORMS, ids=IDS)
def test_map_params_and_abstract_init(name, factory, kwargs, static, make):
    params = make()
    tx = factory(**kwargs)
    state = tx.init(params)
    mapped = optax.tree.map_params(tx, lambda p: p, state)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shapes = jax.eval_shape(tx.init, abstract)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state)
    # the inner Adam has its own count too, so `get` would be ambiguous
    counts = optax.tree.get_all_with_path(state, "count")
    assert counts and all(int(v) == 0 for _, v in counts)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name, factory, kwargs, static, make", TRANSFORMS, ids=IDS)
def test_state_is_stable_across_steps(name, factory, kwargs, static, make, dtype):
    params = make(dtype)
    tx = factory(**kwargs)
    state = tx.init(params)
    sig = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    update = jax.jit(tx.update)
    for g in _grads(params, 4):  # crosses a refresh / re-selection
        u, state = update(g, state, params)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == sig
        assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype,
                                                                  params)
        assert all(np.all(np.isfinite(f64(x))) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name, factory, kwargs, static, make", TRANSFORMS, ids=IDS)
def test_converges_on_a_quadratic(name, factory, kwargs, static, make):
    params = make()
    target = jax.tree.map(lambda x: x + 1.0, params)
    loss = lambda p: sum(jnp.sum((a - b) ** 2)  # noqa: E731
                         for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True))
    tx = factory(**kwargs)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    start = float(loss(params))
    for _ in range(40):
        params, state = step(params, state)
    assert float(loss(params)) < 0.5 * start


def test_no_retrace_over_five_steps():
    from tests.helpers import count_traces

    params = _matrix_params()
    tx = optim.galore(0.05, rank=2, update_proj_gap=2, inner=HF)
    fn, counter = count_traces(tx.update)
    update = jax.jit(fn)
    state = tx.init(params)
    for g in _grads(params, 5):
        _, state = update(g, state, params)
    assert counter["n"] == 1
    assert_tree_allclose(state[0].count, jnp.asarray(5, jnp.int32), **EXACT)


def test_bf16_tolerance_is_used_somewhere():
    # bf16 updates track the f32 ones to bf16 precision on one step.
    p32, p16 = _matrix_params(), _matrix_params(jnp.bfloat16)
    tx = optim.galore(0.05, rank=2, inner=HF)
    (a,), _ = _run(tx, p32, _grads(p32, 1))
    (b,), _ = _run(tx, p16, [jax.tree.map(lambda x: x.astype(jnp.bfloat16), g)
                             for g in _grads(p32, 1)])
    np.testing.assert_allclose(f64(b["bias"]), f64(a["bias"]), **BF16)
