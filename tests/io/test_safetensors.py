"""peftjax.io safetensors reader/writer."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from peftjax import io


def test_roundtrip_dtypes_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "h": rng.standard_normal(5).astype(np.float16),
        "b": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        "i": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    path = tmp_path / "x.safetensors"
    io.write_safetensors(path, arrays, metadata={"format": "np"})
    got, meta = io.read_safetensors(path)
    assert meta == {"format": "np"}
    assert sorted(got) == sorted(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)


def test_names_subset_and_missing(tmp_path):
    path = tmp_path / "x.safetensors"
    io.write_safetensors(
        path, {"a": np.ones(2, np.float32), "b": np.zeros(3, np.float32)}
    )
    got, meta = io.read_safetensors(path, names=["b"])
    assert list(got) == ["b"] and meta == {}
    with pytest.raises(ValueError, match="no tensor.*'c'"):
        io.read_safetensors(path, names=["c"])


def test_missing_and_corrupt_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        io.read_safetensors(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        io.read_safetensors(bad)


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match=r"metadata\['n'\]"):
        io.write_safetensors(
            tmp_path / "x.safetensors", {"a": np.ones(1)}, metadata={"n": 1}
        )


def test_sharded_index(tmp_path):
    io.write_safetensors(tmp_path / "s1.safetensors", {"x": np.ones(2, np.float32)})
    io.write_safetensors(
        tmp_path / "s2.safetensors",
        {"y": np.full((2, 2), 3.0, np.float32), "z": np.zeros(1)},
    )
    index = {
        "metadata": {"total_size": 40},
        "weight_map": {
            "x": "s1.safetensors",
            "y": "s2.safetensors",
            "z": "s2.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got, meta = io.read_safetensors_index(tmp_path / "model.safetensors.index.json")
    assert sorted(got) == ["x", "y", "z"] and meta == {"total_size": "40"}
    np.testing.assert_array_equal(got["y"], np.full((2, 2), 3.0, np.float32))
    index["weight_map"]["w"] = "s3.safetensors"
    (tmp_path / "bad.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shard 's3.safetensors'"):
        io.read_safetensors_index(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match="weight_map"):
        io.read_safetensors_index(os.fspath(tmp_path / "empty.json"))
