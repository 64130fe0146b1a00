"""compare_methods runs the PEFT parity III methods by name (a file of its own,
so that pytest-xdist runs it beside the other smoke runs)."""

import json

from tests.experiments.conftest import run_script


def test_compare_methods_smoke_parity_iii(tmp_path):
    # PEFT parity III by name: held-out perplexity falls and nothing is materialised;
    # LoRA-FA and Riemannian LoRA are LoRA with their optimizers; orthogonal
    # and MiCA are LoRA inits (MiCA's b frozen); QA-LoRA pools x first,
    # BD-LoRA multiplies blocks (both factored forms)
    methods = ["lorafa", "riemannian", "orthogonal", "mica", "qalora", "bdlora"]
    res = run_script("compare_methods.py", "--smoke", "--progress=false",
                     "--isolate=false", f"--methods={','.join(methods)}",
                     f"--out_dir={tmp_path}", timeout=480)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == methods
    for r in rows:  # the held-out perplexity falls (the batch losses move without training)
        assert r["eval_ppl"] < r["eval_ppl_before"] * 0.99, (
            r["method"], r["eval_ppl_before"], r["eval_ppl"])
    assert "materializ" not in res.stderr.lower(), res.stderr[-2000:]
