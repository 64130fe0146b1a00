"""peftjax.io GGUF reader: metadata, float and quantised tensors, errors."""

import gguf
import ml_dtypes
import numpy as np
import pytest

from peftjax import io
from tests.helpers import EXACT


def _write(path, tensors, *, raw=None, meta=True):
    w = gguf.GGUFWriter(str(path), "llama")
    if meta:
        w.add_block_count(3)
        w.add_rope_freq_base(1e5)
        w.add_token_list(["a", "b", "<s>"])
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    for name, (data, shape, qtype) in (raw or {}).items():
        del shape  # byte shape: gguf derives the element shape
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_float_tensors_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((6, 4)).astype(np.float32)
    w16 = rng.standard_normal((2, 3)).astype(np.float16)
    _write(tmp_path / "m.gguf", {"w32": w32, "w16": w16})
    f = io.read_gguf(tmp_path / "m.gguf")
    assert f.metadata["general.architecture"] == "llama"
    assert f.metadata["llama.block_count"] == 3
    assert f.metadata["llama.rope.freq_base"] == 1e5
    assert f.metadata["tokenizer.ggml.tokens"] == ["a", "b", "<s>"]
    assert f.tensor_types == {"w32": "F32", "w16": "F16"}
    np.testing.assert_allclose(f.tensors["w32"], w32, **EXACT)
    np.testing.assert_allclose(f.tensors["w16"], w16.astype(np.float32), **EXACT)
    assert f.tensors["w16"].dtype == np.float32
    assert io.read_gguf_metadata(tmp_path / "m.gguf")["llama.block_count"] == 3
    b = io.read_gguf(tmp_path / "m.gguf", dtype=ml_dtypes.bfloat16, names=["w32"])
    assert list(b.tensors) == ["w32"] and b.tensors["w32"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize(
    "qtype", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1]
)
def test_quantised_tensor_dequantises_like_reference(tmp_path, qtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)  # (out, in), blocks of 32
    q = gguf.quants.quantize(w, qtype)
    _write(tmp_path / "q.gguf", {}, raw={"w": (q, w.shape, qtype)})
    got = io.read_gguf(tmp_path / "q.gguf").tensors["w"]
    assert got.shape == w.shape
    # Independent reference: decode the block bytes. Q8_0 = f16 scale d + 32
    # int8 (x = d*q); Q4_1 = f16 d, f16 m + 16 bytes of nibbles, low nibbles
    # are elements 0..15, high nibbles 16..31 (x = d*q + m).
    blocks = np.asarray(q).reshape(w.size // 32, -1)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        ref = d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    else:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        nib = blocks[:, 4:]
        qs = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.float32)
        ref = d * qs + m
    np.testing.assert_allclose(got, ref.reshape(w.shape), **EXACT)
    assert np.abs(got - w).max() <= np.abs(w).max() / 7  # coarse sanity: 4 bits


def test_unsupported_quant_type_is_a_clear_error(tmp_path):
    # Q8_1 (block of 32 in 40 bytes) has no dequantiser in gguf 0.19.
    raw = np.zeros((4, 40), np.uint8)
    _write(
        tmp_path / "q81.gguf",
        {},
        raw={"blk.0.attn_q.weight": (raw, (4, 32), gguf.GGMLQuantizationType.Q8_1)},
    )
    with pytest.raises(ValueError, match=r"'blk.0.attn_q.weight'.*\(4, 32\).*Q8_1"):
        io.read_gguf(tmp_path / "q81.gguf")


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        io.read_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"definitely not gguf")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        io.read_gguf(tmp_path / "junk.gguf")
    _write(tmp_path / "m.gguf", {"w": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=r"no tensor.*'x'"):
        io.read_gguf(tmp_path / "m.gguf", names=["x"])
    with pytest.raises(TypeError, match="dtype"):
        io.read_gguf(tmp_path / "m.gguf", dtype=np.int32)
