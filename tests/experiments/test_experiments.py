"""compare_methods and pretrain_galore in smoke mode: tables, plots, records."""

import json
import math
import os

import pytest

from tests.experiments.conftest import ROOT, run_script

pytestmark = pytest.mark.slow


def test_compare_methods_smoke(tmp_path):
    res = run_script("compare_methods.py", "--smoke", "--progress=false",
                     "--methods=full,lora,galore", f"--out_dir={tmp_path}")
    out = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"full", "lora", "galore"}
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["lora"]["optimizer_state_bytes"] < rows["galore"]["optimizer_state_bytes"] \
        < rows["full"]["optimizer_state_bytes"]
    for r in rows.values():
        assert r["eval_ppl"] > 1 and r["peak_temp_bytes"] > 0 and len(r["losses"]) == 6
    assert {"git_sha", "jax", "backend"} <= set(out["environment"])
    for png in ("loss_curves.png", "ppl_vs_trainable.png", "ppl_vs_optimizer_memory.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "| lora |" in (tmp_path / "table.md").read_text()
    assert "held-out ppl" in res.stdout


def test_compare_methods_rejects_unknown_method_before_work(tmp_path):
    res = run_script("compare_methods.py", "--smoke", "--methods=lora,lorra",
                     f"--out_dir={tmp_path}", check=False, timeout=120)
    assert res.returncode != 0 and "'lorra' is unknown" in res.stderr
    assert not (tmp_path / "results.json").exists()


def test_compare_methods_smoke_bf16_packed_lora_sb_sparse(tmp_path):
    # one process (--isolate=false), bf16 base and activations, packed blocks:
    # LoRA-SB (gradient statistics) and SpIEL (its own step) next to LoRA, whose
    # budget the sparse deltas match, and an optimizer-side method (full)
    res = run_script("compare_methods.py", "--smoke", "--progress=false",
                     "--dtype=bf16", "--pack", "--isolate=false",
                     "--methods=lora-sb,sparse,lora,full", f"--out_dir={tmp_path}")
    out = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"lora-sb", "sparse", "lora", "full"}
    assert out["config"]["dtype"] == "bf16" and ", bf16" in res.stdout
    assert rows["sparse"]["trainable_params"] == rows["lora"]["trainable_params"]
    # r² per matrix: rank 4, q/k/v/o, 2 layers
    assert rows["lora-sb"]["trainable_params"] == 4 * 4 * 4 * 2
    for r in rows.values():
        assert r["dtype"] == "bf16" and len(r["losses"]) == 6
        assert all(math.isfinite(x) for x in r["losses"]) and 1 < r["eval_ppl"] < 256
    for name in ("lora", "full"):
        # float32 Adam moments (2 x 4 bytes per trainable parameter) + counters:
        # the trainables (adapters, or the float32 master copy) stay float32
        r = rows[name]
        assert 8 * r["trainable_params"] <= r["optimizer_state_bytes"] \
            <= 8 * r["trainable_params"] + 64


def test_pretrain_galore_smoke(tmp_path):
    # FRUGAL runs in notebook 02; three methods keep this test short
    res = run_script("pretrain_galore.py", "--smoke", "--progress=false",
                     "--methods=adamw,galore,lora", f"--out_dir={tmp_path}")
    out = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"adamw", "galore", "lora"}
    # matched memory: LoRA's optimizer state is the closest to GaLore's
    g, lo = rows["galore"]["optimizer_state_bytes"], rows["lora"]["optimizer_state_bytes"]
    assert abs(lo - g) / g < 0.5
    assert rows["adamw"]["optimizer_state_bytes"] > g
    assert "matched memory" in res.stdout


@pytest.mark.parametrize("script", ["compare_methods", "init_comparison", "pretrain_galore"])
def test_explicit_flags_are_kept_under_smoke(script):
    """``--smoke --steps=<default>`` keeps the steps given, as the demo does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"{script}_cli", os.path.join(ROOT, "experiments", f"{script}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    default = mod.Config.steps
    assert mod.SMOKE["steps"] != default
    assert mod.parse(["--smoke", f"--steps={default}"]).steps == default
    assert mod.parse(["--smoke"]).steps == mod.SMOKE["steps"]
    assert mod.parse([f"--steps={default}"]) == mod.Config()
