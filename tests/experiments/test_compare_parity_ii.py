"""compare_methods runs the PEFT parity II tuners by name (a file of its own, so
that pytest-xdist runs it beside the other smoke runs)."""

import json

from tests.experiments.conftest import run_script


def test_compare_methods_smoke_orthogonal_and_parity_ii(tmp_path):
    # PEFT parity II by name: losses drop and every method takes its factored
    # form (no materialisation warning): OFT/BOFT rotate x (in_map), RoAd
    # rotates the base product's outputs (out_map), OSF/PSOFT/DeFT are low-rank
    # terms, GLoRA's lora paths, FRoD's sparse core over its shared basis,
    # AdaMSS's per-group projections
    methods = ["oft", "boft", "road", "osf", "psoft", "deft", "glora", "frod", "adamss"]
    res = run_script("compare_methods.py", "--smoke", "--progress=false",
                     "--isolate=false", f"--methods={','.join(methods)}",
                     f"--out_dir={tmp_path}", timeout=480)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == methods
    for r in rows:
        assert r["losses"][-1] < r["losses"][0] - 0.01, (r["method"], r["losses"])
    assert "materializ" not in res.stderr.lower(), res.stderr[-2000:]
