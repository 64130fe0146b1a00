"""The demo in smoke mode: every output file, improving perplexity, clear errors."""

import json
import os

import numpy as np
import pytest

from tests.experiments.conftest import ROOT, run_script

pytestmark = pytest.mark.slow


def test_demo_smoke_writes_every_output(tmp_path):
    out = tmp_path / "demo"
    res = run_script("demo.py", "--smoke", "--progress=false", f"--out_dir={out}")
    results = json.loads((out / "demo_results.json").read_text())
    for k in ("ppl_before", "ppl_after", "trainable_params", "total_params",
              "optimizer_state_bytes", "seconds"):
        assert k in results, k
    assert results["ppl_after"] < results["ppl_before"]
    assert 0 < results["trainable_params"] < results["total_params"]
    # Adam: two moments per trainable parameter in float32, plus counters
    assert results["optimizer_state_bytes"] >= 8 * results["trainable_params"]
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapter").is_dir() and (out / "checkpoints").is_dir()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(rows[0])
    assert rows[0]["lr"] < max(r["lr"] for r in rows)  # warm-up
    assert "held-out perplexity before" in res.stdout
    assert "sample after" in res.stdout
    assert "trainable params" in res.stdout and "optimizer state" in res.stdout
    assert f"adapter (Hugging Face PEFT): {out / 'adapter_peft'}" in res.stdout
    assert results["peft_dir"] == str(out / "adapter_peft")
    _check_peft_equals_orbax(out)


def _check_peft_equals_orbax(out):
    """The PEFT files reload (``io.load_peft``) to the adapter saved with orbax."""
    import jax

    from peftjax import adapters, io, models, tree
    from peftjax.io import checkpoint

    recipe = _recipe()
    cfg, _, params = recipe.tiny_llama(0)  # the smoke model (seed 0), rebuilt
    assert {p.name for p in (out / "adapter_peft").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors"}
    back = io.load_peft(out / "adapter_peft", params,
                        key_map=models.llama.peft_key_map(cfg))
    assert back.config["r"] == 4 and back.config["lora_alpha"] == 8
    assert sorted(back.config["target_modules"]) == ["k_proj", "o_proj", "q_proj",
                                                     "v_proj"]
    saved = checkpoint.restore(out / "adapter", {"trainable": back.state.trainable,
                                                 "frozen": back.state.frozen})
    assert sorted(saved["trainable"]) == [f"layers/self_attn/{m}_proj/kernel"
                                          for m in "koqv"]
    for path, t in saved["trainable"].items():
        peft = back.state.trainable[path]
        np.testing.assert_array_equal(np.asarray(t.a), np.asarray(peft.a))
        np.testing.assert_array_equal(np.asarray(t.b), np.asarray(peft.b))
    # the same adapter: equal merged weights under the demo's own LoRA(4, alpha=8)
    ours = tree.assign(params, [tree.Rule(where=recipe.ATTN,
                                          then=adapters.lora(4, alpha=8.0))])
    want = jax.jit(lambda *a: adapters.materialize(ours, *a))(
        params, saved["trainable"], saved["frozen"])
    got = jax.jit(lambda *a: adapters.materialize(back.assignment, *a))(
        params, back.state.trainable, back.state.frozen)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        got, want)


@pytest.mark.parametrize("method, issue", [("lora-sb", 6), ("sparse", 7)])
def test_unbuilt_methods_name_their_issue(method, issue):
    recipe = _recipe()
    with pytest.raises(NotImplementedError, match=rf"--method={method}: .* issue {issue}"):
        recipe.method(method)(None, None, None, None)
    assert method not in recipe.available_methods()
    assert {"lora", "dora", "lora_xs", "full", "galore", "frugal", "lisa",
            "loraplus", "pissa"} <= set(recipe.available_methods())
    with pytest.raises(ValueError, match="unknown"):
        recipe.method("lorra")


def _recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_recipe", os.path.join(ROOT, "experiments", "_recipe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unknown_option_is_rejected(tmp_path):
    res = run_script("demo.py", "--smok", check=False, timeout=120)
    assert res.returncode != 0 and "unknown option --smok" in res.stderr


def test_demo_smoke_pissa_keeps_the_base_output_at_init(tmp_path):
    out = {}
    for method in ("lora", "pissa"):
        run_script("demo.py", "--smoke", "--progress=false", "--gen_tokens=0",
                   "--steps=4", f"--method={method}", f"--out_dir={tmp_path / method}")
        out[method] = json.loads((tmp_path / method / "demo_results.json").read_text())
    # LoRA (B = 0) and PiSSA (residual + top-r part) both start at the base model
    assert out["pissa"]["ppl_before"] == pytest.approx(out["lora"]["ppl_before"], rel=1e-4)
    assert out["pissa"]["ppl_after"] < out["pissa"]["ppl_before"]
