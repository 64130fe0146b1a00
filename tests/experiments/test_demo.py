"""The demo in smoke mode: every output file, improving perplexity, clear errors."""

import json
import os
import types

import numpy as np
import pytest

from tests.experiments.conftest import ROOT, run_script

pytestmark = pytest.mark.slow


def test_demo_smoke_writes_every_output_and_pissa_starts_at_the_base(tmp_path):
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
    # PiSSA (residual + top-r part) starts at the base model, as LoRA (B = 0) does
    pissa = tmp_path / "pissa"
    run_script("demo.py", "--smoke", "--progress=false", "--gen_tokens=0", "--steps=4",
               "--method=pissa", f"--out_dir={pissa}")
    got = json.loads((pissa / "demo_results.json").read_text())
    assert got["ppl_before"] == pytest.approx(results["ppl_before"], rel=1e-4)
    assert got["ppl_after"] < got["ppl_before"]


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


def test_every_method_is_available_and_stubs_name_their_issue():
    recipe = _recipe()
    assert set(recipe.available_methods()) == set(recipe.METHODS) >= {
        "lora", "dora", "lora_xs", "full", "galore", "frugal", "lisa", "loraplus",
        "pissa", "lora-sb", "sparse"}
    stub = recipe.unavailable("lorax", 9, "LoRAX wiring")
    with pytest.raises(NotImplementedError, match=r"--method=lorax: .* issue 9"):
        stub(None, None, None, None, init_data=None)
    with pytest.raises(ValueError, match="unknown"):
        recipe.method("lorra")


def _smoke_model():
    """The recipe, the smoke model's params (seed 0) and ``{path: shape}`` of
    its attention kernels (q, k, v, o; stacked layers first)."""
    import re

    from peftjax import tree

    recipe = _recipe()
    _, _, params = recipe.tiny_llama(0)
    kernels = {p: x.shape for p, x in tree.leaves_by_path(params).items()
               if re.fullmatch(recipe.ATTN, p)}
    return recipe, params, kernels


def _smoke(tmp_path, method):
    out = tmp_path / method
    res = run_script("demo.py", "--smoke", "--progress=false", "--gen_tokens=0",
                     f"--method={method}", f"--out_dir={out}")
    results = json.loads((out / "demo_results.json").read_text())
    assert np.isfinite(results["ppl_before"]) and np.isfinite(results["ppl_after"])
    assert results["ppl_after"] < results["ppl_before"]
    assert results["peft_dir"] is None and not (out / "adapter_peft").exists()
    assert "this method has no PEFT format" in res.stdout
    assert (out / "adapter").is_dir()
    return out, results


def test_demo_smoke_sparse_has_loras_budget_and_regrows(tmp_path):
    import jax

    from peftjax import adapters
    from peftjax.io import checkpoint

    out, results = _smoke(tmp_path, "sparse")
    recipe, params, kernels = _smoke_model()
    # k = r·(in + out) values per matrix and layer: what LoRA (r = 4) trains
    budget = sum(4 * (s[-2] + s[-1]) * s[0] for s in kernels.values())
    assert results["trainable_params"] == budget == 3584
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"grad_norm", "tokens"} <= set(rows[0])
    # the orbax adapter holds the values and the indices (restored by structure)
    cfg = types.SimpleNamespace(rank=4, alpha=8.0, weight_decay=0.0, targets=None)
    init_key, _ = jax.random.split(jax.random.key(0))  # as the demo splits seed 0
    optim = recipe.OptimConfig(lr=1e-3, total_steps=24)
    setup = recipe.METHODS["sparse"](cfg, params, optim, init_key)
    initial = recipe.start(setup, lambda p, b: 0.0, optim, init_key).state
    saved = checkpoint.restore(out / "adapter", {"trainable": initial.trainable,
                                                 "frozen": initial.frozen})
    assert adapters.num_trainable(saved["trainable"]) == budget
    # drop-and-regrow moved part of the random initial support in every kernel
    for path in kernels:
        before = np.asarray(initial.frozen[path].indices)
        after = np.asarray(saved["frozen"][path].indices)
        assert after.dtype == np.int32 and after.shape == before.shape
        assert (np.sort(after, -1) != np.sort(before, -1)).any(), path


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


def _demo():
    """``experiments/demo.py`` imported in this process (its CLI and ``main``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "demo_cli", os.path.join(ROOT, "experiments", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_explicit_flags_are_kept_and_smoke_fills_only_the_rest():
    demo = _demo()
    cfg = demo.parse(["--smoke", "--rank=8", "--steps=60", "--lr=0.001"])
    # given explicitly, each equal to its default: kept, not replaced by SMOKE's
    assert (cfg.rank, cfg.steps, cfg.lr) == (8, 60, 1e-3)
    assert (demo.Config.rank, demo.Config.steps, demo.Config.lr) == (8, 60, 1e-3)
    # not given: SMOKE's values
    assert (cfg.alpha, cfg.block_len, cfg.checkpoint_every) == (8.0, 32, 8)
    assert demo.parse(["--smoke"]).rank == demo.SMOKE["rank"] == 4
    assert demo.parse(["--rank=8"]) == demo.Config()  # no --smoke: plain defaults
    assert demo.parse(["--smoke=false", "--rank=3"]) == demo.Config(rank=3)


def test_help_documents_every_option(capsys):
    import dataclasses

    demo = _demo()
    fields = dataclasses.fields(demo.Config)
    missing = [f.name for f in fields if len(f.metadata.get("help", "").split()) < 3]
    assert not missing, f"options without a help sentence: {missing}"
    with pytest.raises(SystemExit) as e:
        demo.parse(["--rank=8", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help lines are wrapped
    for f in fields:
        assert f"--{f.name} (default: " in text, f.name
        assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "--rank (default: 8; --smoke: 4)" in text


def test_resume_without_a_usable_checkpoint_fails_before_loading(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from peftjax.io import checkpoint

    demo = _demo()

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --resume was checked")

    monkeypatch.setattr(demo._recipe, "load_lm", no_loading)
    monkeypatch.setattr(demo._recipe, "documents", no_loading)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"--resume: no checkpoint under .*checkpoints"):
        demo.main(demo.parse(["--smoke", "--resume", f"--out_dir={out}"]))
    # a checkpoint whose only step is damaged: named, still before loading
    checkpoint.save(out / "checkpoints", 8, {"w": jnp.ones(2)})
    record = out / "checkpoints" / "8" / "meta" / "metadata"
    record.write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        demo.main(demo.parse(["--smoke", "--resume", f"--out_dir={out}"]))
    msg = str(e.value)
    assert "every checkpoint under" in msg and "(steps [8])" in msg
    assert f"{record}: empty (0 bytes)" in msg
    assert record.exists() and record.stat().st_size == 0  # left as it was


def test_resume_without_checkpoint_is_a_clean_cli_error(tmp_path):
    res = run_script("demo.py", "--smoke", "--resume", f"--out_dir={tmp_path}",
                     check=False, timeout=120)
    assert res.returncode == 1
    assert f"--resume: no checkpoint under {str(tmp_path / 'checkpoints')!r}" in res.stderr
    assert "Traceback" not in res.stderr and "model:" not in res.stdout
