"""Tolerances (docs/architecture.md#tests) and shared test utilities."""

import ast
import re

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


def ref_loha(w, t, f, *, s):
    """LoHa: W + s (a1 b1) * (a2 b2) (elementwise), s = alpha / r."""
    return f64(w) + s * (f64(t.a1) @ f64(t.b1)) * (f64(t.a2) @ f64(t.b2))


def ref_sora(w, t, f, *, s):
    """SoRA: W + s a diag(gate) b."""
    return f64(w) + s * (f64(t.a) * f64(t.gate)[None, :]) @ f64(t.b)


# ---------------------------------------------------------------------------
# Committed goldens: compared by value within a stated bound, never by bytes
# or hashes (XLA, Eigen and LAPACK pick their kernels by CPU, so the last bits
# of a computed tensor differ from one machine to another).
# ---------------------------------------------------------------------------


def tensor_stats(x):
    """dtype, shape and float64 summary statistics of an array.

    The same statistics ``scripts/golden/peft_verify.py`` and
    ``peft_export_verify.py`` record for every tensor torch loaded: the sum,
    the L2 norm, max |x| and a position-weighted sum (so a permuted or
    transposed tensor does not match).
    """
    x = np.asarray(x)
    v = x.astype(np.float64).ravel()
    pos = np.arange(1, v.size + 1, dtype=np.float64) / max(v.size, 1)
    return {
        "dtype": str(x.dtype),
        "shape": list(x.shape),
        "sum": float(v.sum()),
        "l2": float(np.sqrt(v @ v)),
        "max_abs": float(np.abs(v).max(initial=0.0)),
        "weighted_sum": float(v @ pos),
    }


def assert_verified_stats(recorded, tensors, where):
    """The tensors are the ones a golden script verified (its ``tensor_stats``).

    The statistics are float64 reductions of the same float32 values, so they
    agree to the float64 summation order: |Δ| <= 1e-9 · sqrt(n) · L2 for the
    sums, 1e-9 relative for the L2 norm and max |x|. Changing any value of a
    tensor by more than ~1e-7 of its scale breaks them.
    """
    assert sorted(recorded) == sorted(tensors), where
    for k, x in tensors.items():
        want, got = recorded[k], tensor_stats(x)
        assert got["dtype"] == want["dtype"] and got["shape"] == want["shape"], (
            f"{where}: {k}: {got['dtype']}{got['shape']} vs "
            f"{want['dtype']}{want['shape']}"
        )
        scale = 1e-9 * np.sqrt(max(np.size(x), 1)) * want["l2"]
        for s in ("sum", "weighted_sum"):
            assert abs(got[s] - want[s]) <= scale, (where, k, s, got[s], want[s])
        for s in ("l2", "max_abs"):
            assert abs(got[s] - want[s]) <= 1e-9 * want[s], (where, k, s, got, want)


def assert_tensors_close(new, old, rel, where):
    """Same names, dtypes, shapes and |new - old| <= rel · max|old| per tensor.

    ``rel`` is relative to each tensor's largest magnitude (not elementwise:
    SVD-derived factors have entries near zero whose relative error means
    nothing).
    """
    assert sorted(new) == sorted(old), where
    for k, want in old.items():
        got = new[k]
        assert got.dtype == want.dtype and got.shape == want.shape, (
            f"{where}: {k}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
        )
        want64 = np.asarray(want, np.float64)
        np.testing.assert_allclose(
            np.asarray(got, np.float64),
            want64,
            rtol=0,
            atol=rel * np.abs(want64).max(initial=0.0),
            err_msg=f"{where}: {k}",
        )


_GOLDEN_PATH = re.compile(r"(^|[/\\])golden([/\\]|$)")


def reads_goldens(source):
    """Whether a test module's code reads committed reference outputs (goldens).

    True when a string in its code (docstrings do not count) names a
    ``golden`` directory (``Path(...) / "golden" / ...``,
    ``"tests/io/golden/..."``), or a test takes the ``golden`` fixture, or
    the module imports ``GOLDEN_DIR`` (``tests/models/conftest.py``). The root
    conftest marks every test of such a module ``golden``, so new golden
    tests join the second CI pass (other XLA kernels) without a list to keep.

    Args:
        source: the module's Python source.

    Returns:
        ``True`` when the module reads goldens.

    Example:
        >>> reads_goldens('G = np.load(HERE / "golden" / "x.npz")')
        True
        >>> reads_goldens('"See tests/io/golden/ for the files."')  # a docstring
        False
    """
    tree = ast.parse(source)
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            docs.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docs and _GOLDEN_PATH.search(node.value):
                return True
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name.startswith("test") and any(
                a.arg == "golden" for a in node.args.args
            ):
                return True
        elif isinstance(node, ast.ImportFrom):
            if any(a.name == "GOLDEN_DIR" for a in node.names):
                return True
    return False
