"""compare_methods runs the rest of Tier 2 part 1 by name: L4Q, COLA, DePT, the
low-rank-plus-sparse methods and the shared-subspace ones (a file of its own, so
that pytest-xdist runs it beside the other smoke runs)."""


from tests.experiments.conftest import compare_smoke

METHODS = ["l4q", "cola", "dept", "sltrain", "dsee", "roselora", "spp", "intrinsic_dim",
           "said", "mos"]


def test_compare_methods_smoke_tier2_ii(tmp_path):
    # Each lowers the held-out perplexity of its starting point (L4Q starts at the
    # quantised base, DePT at a sampled prompt); COLA's is the merged chain's.
    rows, res = compare_smoke(tmp_path, METHODS, fall=0.995, timeout=900)
    counts = {r["method"]: r["trainable_params"] for r in rows}
    # tiny Llama (d=64, k/v out 32, 2 layers), rank 4 on q,k,v,o
    assert counts["cola"] == counts["roselora"] == 2 * 4 * (128 + 96 + 96 + 128)
    assert counts["intrinsic_dim"] == 64 * 4  # one shared vector
    assert counts["said"] == 256 * 4 + 8  # + one scale per adapted matrix
    assert counts["dsee"] == counts["cola"] + 8 * 128  # + 128 sparse entries each
    # the only materialised kernels are L4Q's (its quantised matrix is the weight)
    warned = [ln for ln in res.stderr.splitlines() if "is materialised" in ln]
    assert warned and all("l4q(" in ln for ln in warned), res.stderr[-2000:]
