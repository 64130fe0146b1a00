"""Helpers for running experiments and notebooks as subprocesses."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
           MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu",
           PYTHONHASHSEED="0", TF_CPP_MIN_LOG_LEVEL="3",
           XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
           # The smoke runs compile the same small programs again and again: share
           # them through JAX's persistent cache (keyed on the HLO and flags).
           JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".pytest_cache", "jax-cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
           PEFTJAX_RESULTS_DIR=os.path.join(tempfile.gettempdir(), "peftjax-test-results"))


def run_script(script, *args, timeout=240, check=True):
    """Runs ``experiments/<script>`` with the test environment; returns the result."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script),
                          *args], capture_output=True, text=True, cwd=ROOT, env=ENV,
                         timeout=timeout)
    if check and out.returncode != 0:
        pytest.fail(f"{script} {' '.join(args)} exited {out.returncode}\n"
                    f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-5000:]}")
    return out


@pytest.fixture(scope="module")
def recipe():
    """``experiments/_recipe.py`` imported as a module (the experiments' shared recipe)."""
    spec = importlib.util.spec_from_file_location(
        "_recipe", os.path.join(ROOT, "experiments", "_recipe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compare_smoke(tmp_path, methods, *, fall=0.995, timeout=900):
    """Runs ``compare_methods.py --smoke`` on ``methods`` in one process and
    checks what every smoke run promises: the rows come back in order and
    each method lowers the held-out perplexity of its starting point by more
    than ``1 - fall`` (the per-batch training losses of the tiny model move
    without training). Returns ``(rows, completed process)``."""
    res = run_script("compare_methods.py", "--smoke", "--progress=false",
                     "--isolate=false", f"--methods={','.join(methods)}",
                     f"--out_dir={tmp_path}", timeout=timeout)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == list(methods)
    for r in rows:
        assert r["eval_ppl"] < r["eval_ppl_before"] * fall, (
            r["method"], r["eval_ppl_before"], r["eval_ppl"])
    return rows, res
