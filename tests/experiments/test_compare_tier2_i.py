"""compare_methods runs the Tier-2 part-1 weight-space methods by name (a file of
its own, so that pytest-xdist runs it beside the other smoke runs)."""


from tests.experiments.conftest import compare_smoke

METHODS = ["svft", "loldu", "vectorfit", "kasa", "salt", "clover", "mora", "lamda",
           "flora", "dylora", "increlora", "lora_b_only"]


def test_compare_methods_smoke_tier2_i(tmp_path):
    # Each lowers the held-out perplexity of its starting point (SVFT and KaSA
    # start away from the base model, as their papers/PEFT do), and the
    # factored path takes every one but SALT (no factored form: one row would
    # cost more than the base product).
    rows, res = compare_smoke(tmp_path, METHODS, fall=0.995, timeout=900)
    counts = {r["method"]: r["trainable_params"] for r in rows}
    # tiny Llama (d=64, k/v out 32, 2 layers), rank 4 on q,k,v,o: per layer
    # n = min(in, out) = 64, 32, 32, 64
    assert counts["vectorfit"] == counts["loldu"] == 2 * (64 + 32 + 32 + 64)
    assert counts["svft"] == 2 * (65 + 33 + 33 + 65)  # the diagonal and a gate
    assert counts["lora_b_only"] == 2 * 4 * (64 + 32 + 32 + 64)  # r·out
    assert counts["dylora"] == 2 * 4 * (128 + 96 + 96 + 128)  # LoRA's count
    assert counts["kasa"] == counts["dylora"] + 2 * 4 * 4  # + the r singular values
    # the only materialised kernels are SALT's (the warning names the adapter)
    warned = [ln for ln in res.stderr.splitlines() if "is materialised" in ln]
    assert warned and all("salt(" in ln for ln in warned), res.stderr[-2000:]
