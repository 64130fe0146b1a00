"""MiSS (adapters.miss): PEFT's numbers for balance, mini and bat, a float64
reference, the factored form, init, stacked layers and shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h

V = adapters.MiSSVariant


def ref_miss(w, t, f, *, variant=V.BALANCE, mini_r=1):
    """float64 ``W'`` built in torch layout ``(out, in)`` with explicit loops.

    Balance/mini: torch column ``c`` gets ``D[c mod r, :]`` (mini: ``D`` is
    ``miss_block`` repeated along out). Bat: block ``W[a, c] (r × r)`` becomes
    ``W[a, c] @ (I + B[a]) + B[a]``.
    """
    wt = h.f64(w).T.copy()  # (out, in)
    blk = h.f64(t.block)
    n_out, n_in = wt.shape
    if variant is V.BAT:
        r = blk.shape[-1]
        for a in range(n_out // r):
            for c in range(n_in // r):
                wb = wt[a * r:(a + 1) * r, c * r:(c + 1) * r]
                wt[a * r:(a + 1) * r, c * r:(c + 1) * r] = wb @ (np.eye(r) + blk[a]) + blk[a]
        return wt.T
    if variant is V.MINI:
        blk = np.concatenate([blk] * (n_out // mini_r), axis=1)
    r = blk.shape[0]
    for c in range(n_in):
        wt[:, c] += blk[c % r, :]
    return wt.T


def _det(shape, phase):
    """The deterministic tensors of the PEFT run below (torch shapes)."""
    n = int(np.prod(shape))
    return np.sin(np.arange(n) * 0.7 + phase).reshape(shape) * 0.5


# PEFT 0.21.2 MissLinear, float64, W = _det((out, in), .3), miss_block = _det(shape, 1),
# x = _det((1, 2, in), 5): merged weight (out, in) after merge(), and forward(x) before.
# balance: nn.Linear(5, 6), r=3 (5 % 3 != 0: PEFT's remainder path); mini: r=3,
# mini_r=2; bat: nn.Linear(4, 6), r=2.
PEFT = {
    V.BALANCE: (5, 3, (3, 6), [
        [0.568495595735, -0.020991835456, 0.508220117953, 0.75846708268, -0.420936996643],
        [0.189903459755, -0.675703391248, -0.754262652307, 0.308894072811, -0.031167650658],
        [0.76294990059, 0.650449805068, -0.158983499992, 0.350119303002, -0.15676464269],
        [-0.469677783817, -0.01250777703, -0.616840728463, 0.184527550785, 0.854799217743],
        [0.187457036666, 0.81982304339, -0.175133049225, -0.624982286645, 0.002646620771],
        [-0.922366148575, 0.160244305806, 0.335394683979, -0.054943008512, 0.82343796235]],
        [[-0.170888245723, 0.148070152235, -0.504822021441, 0.686724962906,
          -0.552291695031, 0.808755898346],
         [-0.040792095866, 0.04541245581, 0.326700010764, -0.5406825689, 0.493367668886,
          -0.794555679521]]),
    V.MINI: (5, 3, (3, 2), [
        [0.568495595735, 0.75846708268, 0.189903459755, 0.75846708268, 0.358521921492],
        [0.189903459755, -0.467974727616, -0.930492386693, 0.308894072811, 0.176561012973],
        [0.845953802718, 0.832410713587, 0.02555566957, 0.433123205131, 0.025196265829],
        [0.005364290193, -0.416935756128, -0.667879699951, 0.659569624795, 0.450371238645],
        [0.914121474541, 0.662875510354, -0.301947353578, 0.10168215123, -0.154300912265],
        [0.062231315483, -0.150449978018, -0.317107594423, 0.929654455547, 0.512743678526]],
        [[-0.01489464321, 0.184316885962, -0.462865359253, 0.538568368312, -0.678376982468,
          0.58795148746],
         [-0.25291408806, 0.009789910392, 0.212806677412, -0.410682996351, 0.534595242627,
          -0.592892197188]]),
    V.BAT: (4, 2, (3, 2, 2), [
        [0.772759182502, 0.998579375303, 1.239244815863, 1.086435321198],
        [0.263947282469, -0.281190458427, -0.505859549161, -0.672466208809],
        [-0.504485597994, -0.270744963522, -0.229310511715, -0.294392278371],
        [-0.21712544278, -0.338884455421, -0.441995880222, -0.432962809681],
        [-0.438744570277, 0.000600774096, 0.557518066325, 1.066822743311],
        [1.22576208559, 0.974205495957, 0.341451903387, -0.091636954332]],
        [[-0.177255026264, -0.323711255596, 0.195765004444, 0.013847437885, 0.631525509851,
          -0.869449227891],
         [0.674059158109, 0.116981140807, -0.318176533474, -0.193912216999,
          -0.400735152022, 1.059950244183]]),
}


@pytest.mark.parametrize("variant", list(V), ids=[v.value for v in V])
def test_miss_matches_peft_numbers_in_float64(variant):
    n_in, r, shape, merged, forward = PEFT[variant]
    with jax.enable_x64(True):
        ad = adapters.miss(r, variant=variant, mini_r=2, param_dtype=jnp.float64)
        t = adapters.MiSSParams(jnp.asarray(_det(shape, 1.0)))
        w = jnp.asarray(_det((6, n_in), 0.3).T)  # Flax (in, out)
        got = ad.apply(w, t, None)
        np.testing.assert_allclose(h.f64(got), np.array(merged).T, rtol=0, atol=1e-10)
        np.testing.assert_allclose(h.f64(got), ref_miss(w, t, None, variant=variant,
                                                        mini_r=2), rtol=0, atol=1e-12)
        x = jnp.asarray(_det((1, 2, n_in), 5.0))
        if variant is V.BAT:  # weight space only; no exact inverse
            assert ad.factored is None and ad.unapply is None
            y = x @ got
        else:
            y = x @ w + ad.factored.terms(w, t, None).delta(x)
            back = ad.unapply(got, t, None, None)
            np.testing.assert_allclose(h.f64(back), h.f64(w), rtol=0, atol=1e-12)
        np.testing.assert_allclose(h.f64(y), np.array([forward]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", list(V), ids=[v.value for v in V])
def test_miss_init_counts_and_stacked_layers(variant, getkey):
    # PEFT: miss_block zeros (r, out) / (r, mini_r) / (out/r, r, r); counts likewise.
    ad = adapters.miss(2, variant=variant, mini_r=3)
    count = {V.BALANCE: 2 * 6, V.MINI: 2 * 3, V.BAT: 6 * 2}[variant]
    params = {"w": jnp.ones((2, 4, 6))}
    a = tree.assign(params, [tree.Rule(where="w", then=ad)], layout=tree.stacked("w"))
    state = adapters.init(a, getkey(), params)
    assert adapters.num_trainable(state.trainable) == 2 * count
    assert not np.any(h.f64(state.trainable["w"].block))
    np.testing.assert_array_equal(
        np.asarray(adapters.materialize(a, params, *state)["w"]), np.ones((2, 4, 6)))
    # PEFT's init_weights=False: kaiming-uniform, bound 1/sqrt(torch fan-in = out).
    t, _ = adapters.miss(4, zero_init=False).init(getkey(), jnp.ones((8, 64)))
    assert 0.8 / 8 < np.abs(h.f64(t.block)).max() <= 1 / 8


def test_miss_stacked_bat_matches_reference(getkey):
    ad = adapters.miss(2, variant=V.BAT).with_dimension_numbers(tree.dims.stacked())
    w = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 6)), jnp.float32)
    t, f = ad.init(getkey(), w)
    t = adapters.MiSSParams(jnp.asarray(
        np.random.default_rng(1).standard_normal((2, 3, 2, 2)) * 0.3, jnp.float32))
    got = ad.apply(w, t, f)
    for i in range(2):
        np.testing.assert_allclose(
            h.f64(got[i]), ref_miss(w[i], adapters.MiSSParams(t.block[i]), None,
                                    variant=V.BAT), **h.MATMUL_F32)


def test_miss_bad_arguments_and_shapes(getkey):
    with pytest.raises(TypeError, match="variant must be a MiSSVariant"):
        adapters.miss(2, variant="bat")
    with pytest.raises(ValueError, match="mini_r must be a positive int"):
        adapters.miss(2, variant=V.MINI, mini_r=0)
    with pytest.raises(ValueError, match="bat variant has none"):
        adapters.miss(2, variant=V.BAT, dropout=0.1)
    with pytest.raises(ValueError, match=r"rank=8 exceeds in=6.*\(in=6, out=5\).*float32"):
        adapters.miss(8).init(getkey(), jnp.ones((6, 5)))
    with pytest.raises(ValueError, match=r"\(in=6, out=5\).*\[rank=2, rank\] blocks"):
        adapters.miss(2, variant=V.BAT).init(getkey(), jnp.ones((6, 5)))
    with pytest.raises(ValueError, match=r"not divisible by mini_r=2"):
        adapters.miss(2, variant=V.MINI, mini_r=2).init(getkey(), jnp.ones((6, 5)))
