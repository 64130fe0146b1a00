"""Source hygiene: computed arrays are never compared by bytes or hashes.

A floating-point result is not a byte string: XLA, Eigen and LAPACK pick
their kernels by CPU, so a test that hashes (or ``tobytes()``-compares) a
tensor it computed passes only on the machine that wrote the expected value.
Goldens are compared within a stated bound (``tests.helpers``:
``assert_tensors_close``, ``assert_verified_stats``). Hashing an INPUT file
read from disk (no arithmetic) is fine; the few files that do so are listed
below with their reason. Exact equality of arrays where no arithmetic
happened (a save/restore round trip, a pure copy) is written with
``np.array_equal`` / ``assert_array_equal``, not bytes.

The golden tests themselves are marked by ``tests/conftest.py`` from their
code (``tests.helpers.reads_goldens``): ``.ci/run`` runs ``-m golden`` again
under other XLA kernels.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import (
    assert_tensors_close,
    assert_verified_stats,
    reads_goldens,
    tensor_stats,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("tests", "scripts/golden")
BYTE_COMPARISON = re.compile(
    r"\bhashlib\b|sha(1|224|256|384|512)\b|\bmd5\b|\bblake2[bs]?\b"
    r"|\.hexdigest\s*\(|\.tobytes\s*\("
)
# Files that may hash, each with its reason: INPUT files read from disk only.
# `.tobytes()` stays forbidden in them (hashing a file needs no array bytes).
ALLOWED = {
    "tests/models/test_smollm2.py": (
        "checks the SHA-256 of the committed GGUF, the MiniLM safetensors and "
        "inputs.json the goldens were made from (input files, read from disk)"
    ),
    "scripts/golden/make_golden.py": (
        "records the SHA-256 of those same input files in golden.json"
    ),
}
THIS = "tests/test_hygiene.py"  # holds the patterns and the old code as data


def byte_comparisons(text):
    """``[(line number, line)]`` of every hash or ``tobytes()`` use in a source."""
    return [
        (i, line.strip())
        for i, line in enumerate(text.splitlines(), 1)
        if BYTE_COMPARISON.search(line)
    ]


def sources():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


def test_no_hash_or_byte_comparison_of_computed_arrays():
    bad = []
    for rel, text in sources():
        if rel == THIS:
            continue
        for i, line in byte_comparisons(text):
            if rel not in ALLOWED or ".tobytes" in line:
                bad.append(f"{rel}:{i}: {line}")
    assert not bad, (
        "computed arrays compared by bytes or hash (use a stated tolerance, "
        "tests.helpers.assert_tensors_close; np.array_equal where no "
        "arithmetic happened):\n" + "\n".join(bad)
    )


def test_allow_list_is_current():
    for rel, reason in ALLOWED.items():
        assert (ROOT / rel).is_file(), f"{rel}: allowed but missing; drop the entry"
        text = (ROOT / rel).read_text(encoding="utf-8")
        assert byte_comparisons(text), f"{rel}: no longer hashes; drop the entry"
        assert "input" in reason.lower() and len(reason) > 30, rel


def test_scanner_flags_the_old_golden_comparisons():
    # Lines of the byte-exact golden tests and scripts this file replaced.
    old = [
        'assert new[k].tobytes() == old[k].tobytes(), f"{name}: {k}"',
        "return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()",
        'assert verified[name]["tensor_sha256"] == _tensor_sha(committed / name / fn)',
        "new[k].dtype == old[k].dtype and new[k].tobytes() == old[k].tobytes()",
        "fr[k].tobytes() == fc[k].tobytes() for k in fr",
        "import hashlib",
    ]
    for line in old:
        assert byte_comparisons(line), line
    # prose and the tolerance-based replacements pass
    for line in [
        "the SHA-256 of a float tensor ties it to one CPU",
        "assert_tensors_close(new, old, EXPORT_REL, name)",
        "np.testing.assert_array_equal(t1[k], t2[k], strict=True, err_msg=k)",
    ]:
        assert not byte_comparisons(line), line


def test_value_comparisons_keep_their_teeth():
    x = np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32)
    scale = float(np.abs(x).max())
    rec = {"w": tensor_stats(x)}
    assert_verified_stats(rec, {"w": x.copy()}, "same")
    one = x.copy()
    one[2, 3] += np.float32(1e-6 * scale)  # one value moved by 1e-6 of the scale
    for bad in (x.T.copy(), one, x.astype(np.float64), x[:5]):
        with pytest.raises(AssertionError):
            assert_verified_stats(rec, {"w": bad}, "bad")
    near = x + np.float32(0.5e-5 * scale)
    assert_tensors_close({"w": near}, {"w": x}, 1e-5, "within")
    for bad in (x + np.float32(2e-5 * scale), x.astype(np.float64), x[:5]):
        with pytest.raises(AssertionError):
            assert_tensors_close({"w": bad}, {"w": x}, 1e-5, "beyond")
    with pytest.raises(AssertionError):
        assert_tensors_close({"v": x}, {"w": x}, 1e-5, "names")


def test_golden_modules_are_found_from_their_code():
    found = {
        rel
        for rel, text in sources()
        if rel.startswith("tests/")
        and rel.rsplit("/", 1)[-1].startswith("test_")
        and rel != THIS
        and reads_goldens(text)
    }
    assert {
        "tests/models/test_peft_models.py",
        "tests/models/test_bert_export.py",
        "tests/io/test_peft_export.py",
        "tests/models/test_smollm2.py",  # through GOLDEN_DIR and the fixture
        "tests/models/test_bert.py",  # through the `golden` fixture
        "tests/optim/test_galore.py",
        "tests/inits/test_peft_parity.py",
    } <= found
    assert "tests/io/test_peft.py" not in found  # it names goldens in prose only
    # every committed golden directory has a marked reader next to it
    for d in sorted((ROOT / "tests").rglob("golden")):
        if d.is_dir():
            parent = d.parent.relative_to(ROOT).as_posix() + "/"
            assert any(f.startswith(parent) for f in found), d


def test_conftest_marks_golden_modules():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "golden",
         "-n", "0", "-p", "no:cacheprovider",
         "tests/train/test_sparse.py", "tests/tree/test_paths.py"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ids = [s for s in out.stdout.splitlines() if "::" in s]
    assert ids and all(s.startswith("tests/train/test_sparse.py::") for s in ids)
