"""The benchmarks' shared harness and command lines (nothing is timed here)."""

import importlib.util
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from peftjax import train
from peftjax.models import llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")
SCRIPTS = ["lora_step", "model_step", "optim_step", "profile_lora_step", "qlora_step",
           "sharded_step", "sparse_step"]


@pytest.fixture
def load(monkeypatch):
    """Imports ``benchmarks/<name>.py`` with sys.path, sys.modules and XLA_FLAGS restored."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    before = set(sys.modules)

    def _load(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    yield _load
    for name in set(sys.modules) - before:
        if name.startswith("_harness") or name in SCRIPTS:
            del sys.modules[name]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_parses_smoke_and_keeps_explicit_flags(name, load):
    mod = load(name)
    cfg = train.parse_config(mod.Config, ["--smoke"], smoke=mod.SMOKE)
    assert cfg.smoke and all(getattr(cfg, k) == v for k, v in mod.SMOKE.items())
    field = sorted(mod.SMOKE)[0]
    default = getattr(mod.Config(), field)
    kept = train.parse_config(mod.Config, ["--smoke", f"--{field}={default}"], smoke=mod.SMOKE)
    assert getattr(kept, field) == default != mod.SMOKE[field]
    assert train.parse_config(mod.Config, ["--json=out.json"]).json == "out.json"
    undocumented = [f for f, v in mod.Config.__dataclass_fields__.items()
                    if not v.metadata.get("help")]
    assert not undocumented, f"{name}: options without a help sentence: {undocumented}"


def test_records_median_cpu_model_and_json(load, tmp_path):
    h = load("_harness")
    assert h.median([]) is None and h.median([3.0, 1.0, 2.0]) == 2.0
    assert h.median([4.0, 1.0]) == 2.5
    rec = h.machine()
    assert rec["cpu_model"] and rec["cpu_model"] != "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            assert rec["cpu_model"] in f.read()
    assert rec["jax"] == jax.__version__ and rec["backend"] == jax.default_backend()
    path = tmp_path / "sub" / "r.json"
    h.write_json(str(path), {"x": 1.5, "versions": rec})
    assert json.loads(path.read_text()) == {"x": 1.5, "versions": rec}
    h.write_json("", {"x": 1})  # no path: nothing written, no error


def test_tiny_model_step_bytes_and_loss(load):
    h = load("_harness")
    mcfg, params = h.tiny_model(0, num_hidden_layers=1)  # the benchmarks' default: 4
    assert mcfg == llama.tiny_config(num_hidden_layers=1)
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert sum(x.size for x in jax.tree.leaves(params)) == 256 * 64 + per_layer + 64
    # step_bytes: argument + output + temp - alias of the compiled program
    compiled = jax.jit(lambda x: x * 2.0, donate_argnums=0).lower(
        jnp.zeros((64, 32), jnp.float32)).compile()
    m = compiled.memory_analysis()
    assert h.step_bytes(compiled) == (m.argument_size_in_bytes + m.output_size_in_bytes
                                      + m.temp_size_in_bytes - m.alias_size_in_bytes)
    assert m.argument_size_in_bytes == 64 * 32 * 4
    # lm_loss: a model whose logits are uniform has loss log(V)
    from flax import nnx

    gdef = nnx.graphdef(nnx.eval_shape(lambda: llama.LlamaForCausalLM(
        mcfg, rngs=nnx.Rngs(0))))
    zero_head = jax.tree.map(jnp.zeros_like, params)
    ids = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    loss = jax.jit(h.lm_loss(gdef))(zero_head, ids)
    assert math.isclose(float(loss), math.log(256), rel_tol=1e-6)
