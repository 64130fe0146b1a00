"""BD-LoRA (peftjax.adapters.bdlora): PEFT's BlockDiagonalLinear forward and
get_delta_weight in float64 (torch layout), both sides; PEFT's init; the factored form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from peftjax import adapters
from tests import helpers as h


def _peft_block_linear(x, weight, nb):
    """float64 PEFT ``BlockDiagonalLinear.forward`` (weight ``(out, in/nb)``)."""
    n_out = weight.shape[0]
    xb = x.reshape(x.shape[0], nb, -1)
    w = weight.reshape(nb, n_out // nb, -1)
    return np.einsum("bim,inm->bin", xb, w).reshape(x.shape[0], -1)


def _to_torch(blocks):
    """Flax ``(nb, p, q)`` blocks as PEFT's ``(nb·q, p)`` BlockDiagonalLinear weight."""
    return np.transpose(blocks, (0, 2, 1)).reshape(-1, blocks.shape[1])


def ref_bdlora(w, t, f, s=1.0, side="a"):
    """float64 ``W0 + s·A@B`` with PEFT's ``torch.block_diag`` of the chunks."""
    a, b = h.f64(t.a), h.f64(t.b)
    if side == "a":
        a = scipy.linalg.block_diag(*a)
    else:
        b = scipy.linalg.block_diag(*b)
    return h.f64(w) + s * a @ b


@pytest.mark.parametrize("side", ["a", "b"])
def test_bdlora_is_peft_forward_and_delta_in_float64(side):
    rng = np.random.default_rng(0)
    n_in, n_out, r, nb = 12, 8, 4, 2
    w = rng.standard_normal((n_in, n_out))
    x = rng.standard_normal((5, n_in))
    if side == "a":
        t64 = (rng.standard_normal((nb, n_in // nb, r // nb)), rng.standard_normal((r, n_out)))
        h_ = _peft_block_linear(x, _to_torch(t64[0]), nb)  # PEFT lora_A
        delta = h_ @ t64[1]  # PEFT lora_B: weight (out, r) = b.T
        dw = (scipy.linalg.block_diag(*np.split(_to_torch(t64[0]), nb, axis=0))).T @ t64[1]
    else:
        t64 = (rng.standard_normal((n_in, r)), rng.standard_normal((nb, r // nb, n_out // nb)))
        delta = _peft_block_linear(x @ t64[0], _to_torch(t64[1]), nb)
        dw = t64[0] @ scipy.linalg.block_diag(*np.split(_to_torch(t64[1]), nb, axis=0)).T
    s = 6.0 / r
    want = x @ w + s * delta
    np.testing.assert_allclose(x @ (w + s * dw), want, atol=1e-12)  # PEFT's merge
    with jax.enable_x64(True):
        ad = adapters.bdlora(r, nblocks=nb, block_diagonal=side, alpha=6.0,
                             param_dtype=jnp.float64)
        t = adapters.BdLoRAParams(*map(jnp.asarray, t64))
        wp = ad.apply(jnp.asarray(w), t, None)
        np.testing.assert_allclose(x @ np.asarray(wp), want, atol=1e-12)
        np.testing.assert_allclose(np.asarray(wp), ref_bdlora(w, t, None, s, side),
                                   atol=1e-12)
        terms = ad.factored.terms(jnp.asarray(w), t, None)
        np.testing.assert_allclose(x @ w + np.asarray(terms.delta(jnp.asarray(x))), want,
                                   atol=1e-12)


def test_bdlora_init_count_and_errors(getkey):
    w = jnp.zeros((64, 32))
    ta, _ = adapters.bdlora(8, nblocks=4, block_diagonal="a").init(getkey(), w)
    assert ta.a.shape == (4, 16, 2) and ta.b.shape == (8, 32) and not np.any(h.f64(ta.b))
    bound = np.sqrt(6 / 16)  # torch kaiming_uniform_(a=0), fan-in in/nb
    assert 0.8 * bound < np.abs(h.f64(ta.a)).max() <= bound
    tb, _ = adapters.bdlora(8, nblocks=4, block_diagonal="b").init(getkey(), w)
    assert tb.a.shape == (64, 8) and tb.b.shape == (4, 2, 8) and not np.any(h.f64(tb.b))
    assert 0.8 / 8 < np.abs(h.f64(tb.a)).max() <= 1 / 8  # LoRA's U(±1/sqrt(in))
    assert adapters.bdlora(8, nblocks=4, block_diagonal="a").num_trainable(w) == \
        8 * 64 // 4 + 8 * 32
    assert adapters.bdlora(8, nblocks=4, block_diagonal="b").num_trainable(w) == \
        8 * 64 + 8 * 32 // 4
    with pytest.raises(ValueError, match="nblocks=3 does not divide in=64"):
        adapters.bdlora(3, nblocks=3, block_diagonal="a").init(getkey(), w)
    with pytest.raises(ValueError, match="does not divide rank"):
        adapters.bdlora(6, nblocks=4, block_diagonal="b")
    with pytest.raises(ValueError, match="block_diagonal"):
        adapters.bdlora(4, nblocks=2, block_diagonal="c")
