"""Sharded training on 8 simulated CPU devices equals single-device training.

One subprocess (``tests/shard/_multidevice.py``, started once per module with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) trains a tiny Llama
with every method on one device and on data-parallel, FSDP and
tensor-parallel meshes and writes the results; the tests compare them. The
reference for every sharded run is the same step jitted on one device.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers as h

pytestmark = [pytest.mark.multidevice, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# SVD bases: singular-vector rounding is amplified by 1/gap of the singular
# values (~1e-5 here); the parameters they produce still agree to MATMUL_F32.
BASIS = dict(rtol=0.0, atol=5e-5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multidevice")
    env = dict(
        os.environ,
        PYTHONPATH=ROOT,
        JAX_PLATFORMS="cpu",
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
        # 8 devices; LLVM optimisation off: these tiny programs compile ~2x
        # faster and both sides of every comparison use the same flags.
        XLA_FLAGS="--xla_force_host_platform_device_count=8 "
        "--xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.shard._multidevice", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    arrays = np.load(out / "arrays.npz")
    return results, {k: arrays[k] for k in arrays.files}


def _group(arrays, method, mesh):
    prefix = f"{method}/{mesh}/"
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _assert_same(got, want, **tol):
    assert sorted(got) == sorted(want) and got
    for path in want:
        x, y = got[path], want[path]
        assert x.shape == y.shape and x.dtype == y.dtype, path
        if np.issubdtype(y.dtype, np.floating):
            np.testing.assert_allclose(h.f64(x), h.f64(y), err_msg=path, **tol)
        else:
            np.testing.assert_array_equal(x, y, err_msg=path)


@pytest.mark.parametrize(
    "method, mesh",
    [
        ("lora", "8x1x1"),
        ("lora", "1x8x1"),
        ("lora", "1x2x4"),
        ("lora_sb", "2x2x2"),
        ("galore", "1x8x1"),
        ("galore", "2x1x4"),
    ],
)
def test_sharded_steps_equal_single_device(run, method, mesh):
    results, arrays = run
    single = _group(arrays, method, "single")
    assert results[method]["moved"] > 1e-3  # it trained
    _assert_same(_group(arrays, method, mesh), single, **h.MATMUL_F32)
    if method == "galore":
        # GaLore's state: moments to MATMUL_F32, projector bases as subspaces
        got = _group(arrays, method, mesh + "_state")
        want = _group(arrays, method, "single_state")
        bases = [p for p in want if "/projector/" in p]
        assert len(bases) == 7  # q, k, v, o, gate, up, down (stacked)
        _assert_same({p: got[p] for p in bases}, {p: want[p] for p in bases}, **BASIS)
        _assert_same(
            {p: got[p] for p in want if p not in bases},
            {p: want[p] for p in want if p not in bases},
            **h.MATMUL_F32,
        )
        assert results["galore"]["settings"] == {
            "1x8x1": "spread",
            "2x1x4": "per_layer",
        }


def test_losses_agree_across_meshes(run):
    results, _ = run
    for method in ("lora", "lora_sb"):
        for mesh, r in results[method]["meshes"].items():
            np.testing.assert_allclose(
                r["loss"],
                results[method]["loss_single"],
                err_msg=f"{method} {mesh}",
                **h.MATMUL_F32,
            )


def test_frugal_signs_and_selection_then_values(run):
    results, arrays = run
    single = results["frugal"]["record_single"]
    assert len(single) == 4 and results["frugal"]["moved"] > 1e-3
    for mesh, r in results["frugal"]["meshes"].items():
        for step, (a, b) in enumerate(zip(r["record"], single, strict=True)):
            assert a["selected"] == b["selected"], (mesh, step)
            for path in b["signs"]:
                s = np.asarray(b["signs"][path])
                # every entry moved (gradients are kept far from 0 by the ties term)
                assert np.all(s != 0), (path, step)
                np.testing.assert_array_equal(
                    np.asarray(a["signs"][path]),
                    s,
                    err_msg=f"{mesh} step {step} {path}",
                )
        # the coordinate selection changes at each refresh (update_gap = 2)
        first = single[0]["selected"]
        assert any(single[2]["selected"][k] != first[k] for k in first)
        _assert_same(
            _group(arrays, "frugal", mesh),
            _group(arrays, "frugal", "single"),
            **h.MATMUL_F32,
        )


def test_sparse_supports_then_values(run):
    results, arrays = run
    res = results["sparse"]
    single = res["indices_single"]
    assert len(single) == 5 and res["moved"] > 1e-4
    # the support was regrown at the first reselection (after step 1); the
    # second (after step 4) runs too but the constant ties term keeps the pool
    assert all(single[0][p] != res["indices_initial"][p] for p in single[0])
    for mesh, r in res["meshes"].items():
        assert r["indices"] == single, mesh
        _assert_same(
            _group(arrays, "sparse", mesh),
            _group(arrays, "sparse", "single"),
            **h.MATMUL_F32,
        )


def _rows(results):
    for method in ("lora", "lora_sb", "galore", "frugal", "sparse"):
        for mesh, r in results[method]["meshes"].items():
            for kind in ("trainable", "frozen", "opt", "spiel"):
                for row in r.get(kind, []):
                    yield method, mesh, kind, row


def test_no_derived_leaf_is_replicated_where_its_base_is_sharded(run):
    results, _ = run
    sharded_bases = 0
    for method, mesh, kind, (path, base, derived, spec) in _rows(results):
        assert set(base) <= set(derived), (method, mesh, kind, path, base, spec)
        sharded_bases += bool(base)
    assert sharded_bases > 100


def test_lora_factors_follow_input_and_output_axes(run):
    results, _ = run
    tp = {row[0]: row[3] for row in results["lora"]["meshes"]["1x2x4"]["trainable"]}
    # column-parallel q: input axis on fsdp, output on tensor
    assert tp["layers/self_attn/q_proj/kernel/a"] == "P(None, ('fsdp', 'tensor'), None)"
    assert tp["layers/self_attn/q_proj/kernel/b"] == "P(None, None, ('tensor', 'fsdp'))"
    # row-parallel o: input axis on tensor, output on fsdp
    assert tp["layers/self_attn/o_proj/kernel/a"] == "P(None, ('tensor', 'fsdp'), None)"
    assert tp["layers/self_attn/o_proj/kernel/b"] == "P(None, None, ('fsdp', 'tensor'))"
    fsdp = results["lora"]["meshes"]["1x8x1"]
    for path, shape in fsdp["shard_shapes"].items():
        # every factor is split 8 ways on one of its matrix axes
        assert 8 * int(np.prod(shape)) == int(np.prod(fsdp["shapes"][path])), path
    assert all(r["opt_matches_trainable"] for r in results["lora"]["meshes"].values())


def test_galore_state_follows_the_surviving_axis(run):
    results, _ = run
    rows = {r[0]: r[3] for r in results["galore"]["meshes"]["1x8x1"]["opt"]}
    pre = "inner_states/galore/inner_state/0/"
    # q (64, 64): std projects the input axis; mu (L, r, out) takes fsdp on out
    assert (
        rows[pre + "inner_state/mu/layers/self_attn/q_proj/kernel"]
        == "P(None, None, ('tensor', 'fsdp'))"
    )
    # down (128, 64): the output axis is projected; mu (L, in, r) on in
    assert (
        rows[pre + "inner_state/mu/layers/mlp/down_proj/kernel"]
        == "P(None, ('tensor', 'fsdp'), None)"
    )
    # bases (L, in, r) / (L, out, r) on their full-size axis
    assert (
        rows[pre + "projector/layers/self_attn/q_proj/kernel"]
        == "P(None, ('fsdp', 'tensor'), None)"
    )
    assert rows[pre + "count"] == "P()"


def test_pmap_example_matches_jit(run):
    results, arrays = run
    assert results["pmap"]["devices"] == 8
    pmap = _group(arrays, "lora", "pmap")
    _assert_same(pmap, _group(arrays, "lora", "8x1x1"), **h.MATMUL_F32)
    _assert_same(pmap, _group(arrays, "lora", "single"), **h.MATMUL_F32)


def test_checkpoint_saved_on_2x4_restores_on_8x1_and_1x1(run):
    results, _ = run
    res = results["checkpoint"]
    assert res["saved_specs"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    for mesh, devices in (("8x1x1", 8), ("1x1x1", 1)):
        r = res[mesh]
        assert r["bit_exact"] and r["n_leaves"] == 45 and r["step"] == 4
        assert r["mesh"] == dict(
            zip(("data", "fsdp", "tensor"), map(int, mesh.split("x")), strict=True)
        )
        assert r["key_devices"] == devices
    assert res["resume_bit_exact"]
