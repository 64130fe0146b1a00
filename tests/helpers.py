"""Tolerances (docs/architecture.md#tests) and shared test utilities."""

import jax
import numpy as np

# Named tolerances; any looser literal in a test needs a comment.
ELEMENTWISE_F32 = dict(rtol=1e-6, atol=0.0)
MATMUL_F32 = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=1e-2, atol=1e-2)
F16 = dict(rtol=1e-3, atol=1e-3)
GRAD_F32 = dict(rtol=2e-3, atol=2e-3)
GRAD_F64 = dict(rtol=1e-5, atol=1e-5)
EXACT = dict(rtol=0.0, atol=0.0)


def f64(x):
    """A float64 numpy copy of an array (for references)."""
    return np.asarray(jax.device_get(x), dtype=np.float64)


def assert_tree_allclose(a, b, **tol):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"tree structures differ: {ta} vs {tb}"
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(f64(x), f64(y), **tol)


def count_traces(fn):
    """Wraps ``fn`` and counts how many times it is traced (called in Python)."""
    counter = {"n": 0}

    def wrapped(*args, **kwargs):
        counter["n"] += 1
        return fn(*args, **kwargs)

    return wrapped, counter


# ---------------------------------------------------------------------------
# float64 NumPy references of the adapter formulas (Flax layout W (in, out)).
# ---------------------------------------------------------------------------


def ref_lora(w, t, f, *, s):
    return f64(w) + s * f64(t.a) @ f64(t.b)


def ref_dora(w, t, f, *, s):
    v = f64(w) + s * f64(t.a) @ f64(t.b)
    norm = np.sqrt((v**2).sum(axis=0))
    return v * (f64(t.magnitude) / norm)[None, :]


def ref_lora_xs(w, t, f, *, s):
    return f64(w) + s * f64(f.a) @ f64(t.core) @ f64(f.b)


def ref_scale_out(w, t, f):
    return f64(w) * f64(t.scale)[None, :]


def ref_scale_in(w, t, f):
    return f64(t.scale)[:, None] * f64(w)


def ref_ssf_bias(b, t):
    return f64(t.scale) * f64(b) + f64(t.shift)


def ref_vera(w, t, f):
    return f64(w) + (f64(f.a) * f64(t.lambda_d)[None, :]) @ (
        f64(f.b) * f64(t.lambda_b)[None, :])


def ref_adalora(w, t, f, *, s):
    return f64(w) + s * (f64(t.a) * f64(t.e)[None, :]) @ f64(t.b)


def ref_svfit(w, t, f):
    """SVFit: W + U_r diag(delta_s) V_r^T."""
    return f64(w) + (f64(f.u) * f64(t.delta_s)[None, :]) @ f64(f.vt)


def ref_nola(w, t, f, *, s):
    """NOLA: W + s (sum_i alpha_i A_i)(sum_j beta_j B_j)."""
    a = np.einsum("k,kir->ir", f64(t.coef_a), f64(f.a))
    b = np.einsum("k,kro->ro", f64(t.coef_b), f64(f.b))
    return f64(w) + s * a @ b


def ref_abba(w, t, f, *, s):
    """ABBA: W + s (a1 b1) * (a2 b2) (elementwise)."""
    return f64(w) + s * (f64(t.a1) @ f64(t.b1)) * (f64(t.a2) @ f64(t.b2))


def ref_sora(w, t, f, *, s):
    """SoRA: W + s a diag(gate) b."""
    return f64(w) + s * (f64(t.a) * f64(t.gate)[None, :]) @ f64(t.b)
