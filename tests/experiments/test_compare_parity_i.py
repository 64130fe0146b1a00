"""compare_methods runs the PEFT parity I tuners by name (a file of its own, so
that pytest-xdist runs these smoke runs beside the others)."""

import json

from tests.experiments.conftest import run_script


def test_compare_methods_smoke_lokr(tmp_path):
    # LoKr, C3A, WaveFT, TinyLoRA and SHiRA by name: losses drop, and the
    # factored path takes their forms (Kronecker contraction, block FFTs,
    # wavelet windows, the r x r core, the sparse segment-sum: no
    # materialisation fallback warning); RandLoRA and PVeRA: (x@left)@right over
    # their shared frozen bases; VB-LoRA and UniLoRA: (x@a)@b with a, b gathered
    # from their one shared trainable bank / vector; HRA: its reflections of x before
    # the base product (FactoredTerms.in_map)
    res = run_script("compare_methods.py", "--smoke", "--progress=false",
                     "--isolate=false",
                     "--methods=lokr,c3a,waveft,tinylora,shira,randlora,pvera,vblora,"
                     "unilora,hra,supertuning",
                     f"--out_dir={tmp_path}")
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["lokr", "c3a", "waveft", "tinylora", "shira",
                                           "randlora", "pvera", "vblora", "unilora",
                                           "hra", "supertuning"]
    assert rows[0]["losses"][-1] < rows[0]["losses"][0] - 0.05
    for r in rows[1:]:  # C3A: 5.563 -> 5.539, WaveFT: 5.557 -> 5.358 here
        assert r["losses"][-1] < r["losses"][0] - 0.01, r["losses"]
    assert "FactoredFallbackWarning" not in res.stderr and "materialised" not in res.stderr


def test_compare_methods_smoke_fourierft_ln_tuning(tmp_path):
    # FourierFT, LN tuning and trainable tokens by name: losses drop; FourierFT
    # takes its real-basis factored form (no fallback), LN tuning (no factored
    # form: the trained norm vector is the leaf) warns once per norm leaf, and
    # trainable tokens (no factored form: a row scatter) once for the table;
    # DeLoRA takes its low-rank form (no fallback), HiRA (built without its
    # r-matmul form) warns once per adapted kernel
    # GraLoRA and MiSS take their block and shard-sum forms, PEANUT (x@H)@b
    # (no fallback)
    res = run_script("compare_methods.py", "--smoke", "--progress=false",
                     "--isolate=false",
                     "--methods=fourierft,ln_tuning,trainable_tokens,hira,delora,"
                     "gralora,miss,peanut",
                     f"--out_dir={tmp_path}")
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fourierft", "ln_tuning", "trainable_tokens",
                                           "hira", "delora", "gralora", "miss",
                                           "peanut"]
    for r in rows:
        assert r["losses"][-1] < r["losses"][0] - 0.01, r["losses"]
    assert "fourierft on" not in res.stderr
    assert "ln_tuning on 'norm/scale'" in res.stderr
    assert "on 'embed_tokens/embedding'" in res.stderr
    assert "hira(rank=4, init=kaiming_uniform) on 'layers/self_attn/q_proj" in res.stderr
    assert "delora(rank" not in res.stderr
    assert "gralora(rank" not in res.stderr and "miss(rank" not in res.stderr
    assert "peanut(rank" not in res.stderr
