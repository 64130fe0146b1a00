"""compare_methods runs the methods that feed the model inputs (soft prompts,
prefixes, model hooks) by name (a file of its own, so that pytest-xdist runs it
beside the other smoke runs)."""

import types

import pytest

from tests.experiments.conftest import compare_smoke, run_script

METHODS = ["prompt_tuning", "prefix_tuning", "p_tuning", "multitask_prompt_tuning", "cpt",
           "cartridge", "adaption_prompt", "alora", "poly", "xlora"]


def test_compare_methods_smoke_inputs(tmp_path):
    # Each trains only its own parameters (Setup.model feeds them to the model)
    # and lowers the held-out perplexity of its starting point: a loss on the
    # same held-out blocks, not the noisy per-batch training loss. CPT's delta
    # lives in a ball of radius 0.1·sqrt(64/2048): its gain is the smallest.
    rows, res = compare_smoke(tmp_path, METHODS, fall=0.995, timeout=600)
    counts = {r["method"]: r["trainable_params"] for r in rows}
    # tiny Llama: d=64, 2 layers, 2 KV heads of 16, rank 4 (smoke)
    assert counts["prompt_tuning"] == 8 * 64 and counts["cpt"] == 8 * 64
    assert counts["prefix_tuning"] == 2 * 2 * 4 * 2 * 16
    assert counts["cartridge"] == 2 * 2 * 7 * 2 * 16  # one of 8 tokens frozen
    assert counts["adaption_prompt"] == 1 * 4 * 64 + 1  # top layer: prompt + gate
    assert counts["alora"] == 2 * 4 * (64 + 64) * 2 + 2 * 4 * (64 + 32) * 2
    assert counts["p_tuning"] == 8 * 64 + 3 * 64 * 64 + 3 * 64  # MLP encoder, h = d
    assert counts["multitask_prompt_tuning"] == 8 * 64 + 2 * 1 * (8 + 64)
    # Poly: per site 4 skills of rank 2 per layer, a (in, 2) and b (2, out), plus
    # the router logits (layers x tasks x skills)
    assert counts["poly"] == sum(2 * 4 * 2 * (i + o) + 2 * 2 * 4
                                 for i, o in ((64, 64), (64, 32), (64, 32), (64, 64)))
    assert counts["xlora"] == 64 * 2 + 2  # classifier: d -> K experts (not layerwise)
    assert "materializ" not in res.stderr.lower(), res.stderr[-2000:]


def test_compare_methods_inputs_refuse_packed_blocks():
    # a prompt or prefix cannot be combined with packed segments: a clear error
    res = run_script("compare_methods.py", "--smoke", "--progress=false",
                     "--isolate=false", "--methods=prompt_tuning", "--pack=true",
                     "--steps=1", check=False, timeout=300)
    assert res.returncode != 0
    assert "--method=prompt_tuning feeds the model" in res.stderr
    assert "drop --pack" in res.stderr


@pytest.mark.parametrize("name", ["cpt", "alora", "prefix_tuning", "xlora"])
def test_input_methods_need_their_data(name, recipe):
    # built without init_data: the error names the method and what it needs
    cfg = types.SimpleNamespace(rank=4, alpha=8.0)
    with pytest.raises(ValueError, match=f"--method={name} needs"):
        recipe.method(name)(cfg, {"embed_tokens": {"embedding": None}}, None, None)
