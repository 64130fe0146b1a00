"""Damaged checkpoints: one clear error, a fallback to the newest intact step,
and nothing on disk touched.

Step 3 of three saved steps is damaged four ways (a truncated JSON record, a
missing array-store file, a zero-byte file, a removed entry of the step
directory). Each must raise a ``CheckpointError`` naming the directory, the
step and the damaged file; ``fallback=True`` must restore step 2's stored
values; and the directory tree (names, sizes, mtimes) and the intact steps'
file bytes must be the same after all of it as before.
"""

import glob
import os
import pickle
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.io import checkpoint


def _state(step):
    rng = np.random.default_rng(step)
    return {
        "adapter": {"a": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
                    "b": jnp.asarray(rng.standard_normal((2, 3)), jnp.bfloat16)},
        # 2 KiB: above OCDBT's 1 KiB inline limit, so stored in a data file of its own
        "big": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32),
        "count": jnp.asarray(step, jnp.int32),
        "key": jax.random.fold_in(jax.random.key(0), step),
        "step": step,
    }


LIKE = {"adapter": {"a": jax.ShapeDtypeStruct((4, 2), jnp.float32),
                    "b": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)},
        "big": jax.ShapeDtypeStruct((32, 16), jnp.float32),
        "count": jax.ShapeDtypeStruct((), jnp.int32),
        "key": jax.random.key(1), "step": 0}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "template"
    for s in (1, 2, 3):
        checkpoint.save(root, s, _state(s))
    return root


@pytest.fixture
def ckpt(saved, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(saved, d)
    return str(d)


def _truncate_record(d):
    path = os.path.join(d, "3", "meta", "metadata")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return path


def _data_file(d):
    """The file holding the largest array's data (OCDBT stores values over 1 KiB
    out of line, in the per-process store's data files)."""
    files = glob.glob(os.path.join(d, "3", "arrays", "ocdbt.process_0", "d", "*"))
    assert files, "the array store has data files"
    return max(files, key=os.path.getsize)


def _index_file(d):
    """The array store's b-tree node (its index of keys, small values inline)."""
    (path,) = glob.glob(os.path.join(d, "3", "arrays", "d", "*"))
    return path


def _remove_array_file(d):
    path = _data_file(d)
    os.remove(path)
    return path


def _zero_byte_file(d):
    path = _data_file(d)
    open(path, "wb").close()
    return path


def _remove_index_file(d):
    path = _index_file(d)
    os.remove(path)
    return path


def _remove_entry(d):
    path = os.path.join(d, "3", "arrays")
    shutil.rmtree(path)
    return path


def _remove_record_entry(d):
    shutil.rmtree(os.path.join(d, "3", "meta"))
    return os.path.join(d, "3", "meta", "metadata")


DAMAGE = {
    "truncated_metadata": _truncate_record,
    "missing_array_file": _remove_array_file,
    "zero_byte_file": _zero_byte_file,
    "removed_step_directory_entry": _remove_entry,
    "removed_record_directory": _remove_record_entry,
    "missing_index_file": _remove_index_file,
}


def _tree(d):
    """(relative path, is dir, size, mtime) of every entry, root included."""
    out = [("", True, 0, os.stat(d).st_mtime_ns)]
    for base, dirs, files in os.walk(d):
        for name in dirs + files:
            p = os.path.join(base, name)
            st = os.lstat(p)
            out.append((os.path.relpath(p, d), os.path.isdir(p),
                        0 if os.path.isdir(p) else st.st_size, st.st_mtime_ns))
    return sorted(out)


def _bytes(d, steps):
    out = {}
    for s in steps:
        for base, _, files in os.walk(os.path.join(d, str(s))):
            for name in files:
                p = os.path.join(base, name)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, d)] = f.read()
    return out


def _assert_is_step(got, step):
    want = _state(step)
    for k in ("a", "b"):
        assert got["adapter"][k].dtype == want["adapter"][k].dtype
        # stored values read back: exact
        np.testing.assert_array_equal(np.asarray(got["adapter"][k], np.float32),
                                      np.asarray(want["adapter"][k], np.float32))
    np.testing.assert_array_equal(np.asarray(got["big"]), np.asarray(want["big"]))
    assert int(got["count"]) == step and got["step"] == step
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(got["key"])),
                                  np.asarray(jax.random.key_data(want["key"])))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_step_is_named_and_fallback_restores_the_previous_one(ckpt, damage):
    intact = _bytes(ckpt, (1, 2))
    damaged_path = DAMAGE[damage](ckpt)
    before = _tree(ckpt)

    assert checkpoint.latest_step(ckpt) == 3  # orbax still lists the step
    assert checkpoint.latest_intact_step(ckpt) == 2
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(ckpt, LIKE)
    err = e.value
    assert isinstance(err, ValueError)
    assert (err.directory, err.step, err.path) == (ckpt, 3, damaged_path)
    msg = str(err)
    assert f"step 3 under {ckpt!r}" in msg and damaged_path in msg and err.reason in msg
    with pytest.raises(checkpoint.CheckpointError, match="step 3 under"):
        checkpoint.validate(ckpt, 3)
    assert checkpoint.validate(ckpt, 2) == 2

    with pytest.warns(checkpoint.CheckpointWarning) as rec:
        got = checkpoint.restore(ckpt, LIKE, fallback=True)
    _assert_is_step(got, 2)
    (w,) = [r.message for r in rec]
    assert w.step == 2 and sorted(w.skipped) == [3]
    assert w.skipped[3].path == damaged_path
    assert "restored step 2" in str(w) and "skipped damaged steps [3]" in str(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact step restores without a word
        _assert_is_step(checkpoint.restore(ckpt, LIKE, step=2), 2)
        _assert_is_step(checkpoint.restore(ckpt, LIKE, step=1, fallback=False), 1)

    assert _tree(ckpt) == before  # names, sizes and mtimes: nothing written
    assert _bytes(ckpt, (1, 2)) == intact  # the intact steps' stored bytes


def test_every_step_damaged_or_none_at_all(ckpt, tmp_path):
    for s in (1, 2, 3):
        os.remove(os.path.join(ckpt, str(s), "meta", "metadata"))
    assert checkpoint.latest_intact_step(ckpt) is None
    with pytest.raises(checkpoint.CheckpointError, match="no intact step") as e:
        checkpoint.restore(ckpt, LIKE, fallback=True)
    assert e.value.step == 3
    back = pickle.loads(pickle.dumps(e.value))  # crosses process boundaries intact
    assert (type(back), str(back), back.path) == (type(e.value), str(e.value), e.value.path)
    for s in (1, 2, 3):
        assert f"step {s}: " + os.path.join(ckpt, str(s), "meta", "metadata") in str(e.value)
    with pytest.raises(ValueError, match="fallback=True picks the step"):
        checkpoint.restore(ckpt, LIKE, step=2, fallback=True)
    missing = tmp_path / "missing"
    assert checkpoint.latest_intact_step(missing) is None
    with pytest.raises(FileNotFoundError):
        checkpoint.restore(missing, LIKE, fallback=True)
    with pytest.raises(FileNotFoundError):
        checkpoint.validate(missing)
    assert not missing.exists()  # restoring never creates the directory


def test_a_state_of_python_scalars_only_round_trips(tmp_path):
    # orbax refuses an empty array item; such a state is saved without one
    checkpoint.save(tmp_path, 0, {"step": 3, "lr": 0.5, "tag": None})
    assert checkpoint.validate(tmp_path) == 0
    assert checkpoint.restore(tmp_path, {"step": 0, "lr": 0.0, "tag": None}) == {
        "lr": 0.5, "step": 3, "tag": None}


def test_the_docs_example_runs(tmp_path, monkeypatch):
    import re

    doc = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "checkpoints.md")
    with open(doc, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # mkdtemp lands here
    for code in blocks:
        exec(compile(code, "docs/checkpoints.md", "exec"), {})
