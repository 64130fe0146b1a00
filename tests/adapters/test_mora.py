"""MoRA (peftjax.adapters.mora): the authors' merge and forward (golden from their
code, every mora_type), a float64 numpy transcription of their merge for the
contract suite, r̂ and the trainable count, exact unfold, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h

GOLDEN = np.load("tests/adapters/golden/mora/mora.npz")
CASES = sorted({k.split("/")[0] for k in GOLDEN.files})
# Through the adapter (one jitted program): every type once, plus type 6 tiled
# (in < out); the numpy transcription covers every case.
JAX_CASES = [f"20x12_r2_t{t}" for t in range(1, 7)] + ["12x20_r2_t6"]


def _groups_ref(n, r):
    mr, nr = n // r + 1, n // r
    m = n - r * nr
    return [i // mr if i < m * mr else m + (i - m * mr) // max(nr, 1) for i in range(n)]


def mora_delta_ref(m, n_in, n_out, mora_type):
    """float64 ``ΔW (in, out)`` transcribed from the authors' ``get_delta_weight``.

    ``m`` is the Flax ``(r̂, r̂)`` (``lora_A.weight.T``).
    """
    a = np.asarray(m, np.float64).T  # lora_A.weight: (r̂, r̂)
    r = a.shape[0]
    pad = (r - n_in % r) % r
    if mora_type in (1, 4, 5):
        w = np.zeros((r, n_in))
        for i in range(n_in + (0 if mora_type == 5 else pad)):
            w[:, i % n_in] += a[:, i % r]
    elif mora_type in (2, 3):
        w = a[:, _groups_ref(n_in, r)]
    else:  # 6: block-diagonal RoPE-rotated copies of a
        g = -(-n_in // r)
        inv = 1.0 / 10000 ** (np.arange(0, r, 2) / r)
        emb = np.concatenate([np.outer(np.arange(g), inv)] * 2, axis=1)
        a2 = np.concatenate([a[:, r // 2:], -a[:, :r // 2]], axis=1)
        w = np.zeros((g * r, n_in))
        for b in range(g):
            blk = a * np.cos(emb[b]) + a2 * np.sin(emb[b])
            for j in range(r):
                w[b * r:(b + 1) * r, (b * r + j) % n_in] += blk[:, j]
        return w[np.arange(n_out) % (g * r)].T
    if mora_type in (1, 3):
        rows = [o % r for o in range(n_out)]
    elif mora_type in (2, 4):
        rows = _groups_ref(n_out, r)
    else:
        k = n_out // r
        rows = [o // k if o < k * r else o - k * r for o in range(n_out)]
    return w[rows].T


def ref_mora(w, t, f, mora_type=1):
    """float64 ``W0 + ΔW`` (Flax layout)."""
    n_in, n_out = w.shape
    return h.f64(w) + mora_delta_ref(h.f64(t.m), n_in, n_out, mora_type)


def test_mora_matches_authors_code_every_type():
    """Merged weight, factored forward and unfold against the authors' numbers."""
    for case in CASES:  # every case: the numpy transcription of their merge
        a, delta = GOLDEN[f"{case}/a"], GOLDEN[f"{case}/delta"]
        t_type = int(case.rsplit("_t", 1)[1])
        np.testing.assert_allclose(mora_delta_ref(a.T, delta.shape[1], delta.shape[0],
                                                  t_type), delta.T, atol=1e-6)
    specs = []
    for case in JAX_CASES:
        n_out, n_in = GOLDEN[f"{case}/delta"].shape
        rank = int(case.split("_r")[1].split("_")[0])
        specs.append((case, n_in, n_out, rank, int(case.rsplit("_t", 1)[1])))
    rng = np.random.default_rng(0)
    w0s = {c: rng.standard_normal((i, o)) for c, i, o, _, _ in specs}

    def run(params):  # one program for every case (compile once)
        out = {}
        for case, _, _, rank, t_type in specs:
            ad = adapters.mora(rank, mora_type=t_type, param_dtype=jnp.float64)
            w0, t, x = params[case]
            merged = ad.apply(w0, t, None)
            out[case] = (merged - w0, ad.factored.terms(w0, t, None).delta(x),
                         ad.unapply(merged, t, None, None))
        return out

    with jax.enable_x64(True):
        params = {c: (jnp.asarray(w0s[c]),
                      adapters.MoRAParams(jnp.asarray(GOLDEN[f"{c}/a"].T)),
                      jnp.asarray(GOLDEN[f"{c}/x"])) for c, *_ in specs}
        got = jax.device_get(jax.jit(run)(params))
    worst = 0.0
    for case, n_in, n_out, rank, t_type in specs:
        a, x, want = GOLDEN[f"{case}/a"], GOLDEN[f"{case}/x"], GOLDEN[f"{case}/delta"].T
        assert adapters.mora_rank(n_in, n_out, rank, t_type) == a.shape[0]
        delta, y, back = got[case]
        np.testing.assert_allclose(delta, want, atol=1e-6)
        if f"{case}/y" in GOLDEN.files:  # type 5 has no forward in their code
            np.testing.assert_allclose(y, GOLDEN[f"{case}/y"], atol=1e-6)
        np.testing.assert_allclose(y, x @ want, atol=1e-6)
        np.testing.assert_allclose(back, w0s[case], atol=1e-12)
        worst = max(worst, float(np.abs(delta - want).max()))
    # The authors' RoPE table is float32 (type 6); types 1-5 agree to rounding.
    assert worst < 1e-6


def test_mora_rank_and_count():
    assert adapters.mora_rank(576, 576, 8) == 96  # r̂² = 9216 = LoRA's 8·1152
    assert adapters.mora_rank(576, 192, 8) == 78
    assert adapters.mora_rank(576, 192, 8, mora_type=6) == 78
    assert adapters.mora_rank(10, 13, 1, mora_type=6) == 4  # int(5.3) = 5 -> even
    ad = adapters.mora(8)
    per_layer = 2 * ad.num_trainable(jnp.zeros((576, 576))) + 2 * ad.num_trainable(
        jnp.zeros((576, 192)))
    assert per_layer == 2 * 96 ** 2 + 2 * 78 ** 2 == 30600  # SmolLM2 q,k,v,o
    st = adapters.mora(2, mora_type=6).with_dimension_numbers(tree.dims.stacked())
    t, f = jax.eval_shape(st.init, jax.random.key(0), jnp.zeros((3, 20, 12)))
    assert t.m.shape == (3, 8, 8) and f is None  # one r̂ x r̂ per layer


def test_mora_errors():
    with pytest.raises(ValueError, match="mora_type must be one of"):
        adapters.mora(8, mora_type=7)
    with pytest.raises(ValueError, match="mora_type must be one of"):
        adapters.mora(8, mora_type=True)
    with pytest.raises(ValueError, match="rank"):
        adapters.mora(0)
    with pytest.raises(ValueError, match=r"r_hat=0 is too small .* \(1, 1\)"):
        adapters.mora(1, mora_type=6).init(jax.random.key(0), jnp.ones((1, 1)))
