"""PEFT LoRA files with ``layer_replication`` both ways, against torch on the tiny
Llama and BERT, and ``peftjax.models.replicate_layers`` (shared base arrays).

Goldens: ``scripts/golden/peft_layer_replication_make.py`` (torch side; PEFT
replicates its base before loading) and
``scripts/golden/peft_layer_replication_from_peftjax.py`` (peftjax side:
``replicate_layers``, then ``save_peft(layer_replication=...)``).
"""

import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import factored, io, tree
from peftjax import models as pm
from tests.helpers import assert_tensors_close, assert_verified_stats
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_layer_replication"
NAME = "layer_replication"
SCRIPT = tc._script(f"peft_{NAME}_from_peftjax.py")


def _map(kind):
    return tuple(map(tuple, SCRIPT.MAPS[kind]))


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_replicated_lora_gives_torch_outputs(kind, scanned, tmp_path):
    ref = np.load(GOLDEN / "torch_outputs.npz")
    counts = json.loads((GOLDEN / "peft.json").read_text())["trainable_params"]
    params, cfg, key_map, fwd = SCRIPT.load(kind, _map(kind), scanned=scanned)
    assert cfg.num_hidden_layers == 3
    src = GOLDEN / f"{kind}_{NAME}"
    ad = io.load_peft(src, params, key_map=key_map)
    want = ref[f"{kind}_{NAME}"]
    tc.assert_outputs_close(kind, fwd(tc.materialized(ad.assignment, params, ad.state)),
                            want)
    if kind != "llama" or scanned:  # the unrolled Llama checks the factored path
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = fwd.__wrapped__
        got = jax.jit(lambda t, f: factored.transform(
            lambda p, _: raw(p), ad.assignment, t, f)(params, None))(*ad.state)
    tc.assert_outputs_close(kind, got, want)
    assert np.max(np.abs(tc._mask(kind, want) - tc._mask(kind, ref[f"{kind}_base"]))) \
        > 100 * tc.TORCH_ATOL
    assert tc.trainable_count(ad.state) == counts[kind]
    if kind == "llama" and not scanned:  # written back: PEFT's tensors and map
        io.save_peft(tmp_path, ad.assignment, ad.state, params, key_map=key_map,
                     layer_replication=SCRIPT.MAPS[kind])
        assert_tensors_close(io.read_safetensors(tmp_path / "adapter_model.safetensors")[0],
                             io.read_safetensors(src / "adapter_model.safetensors")[0],
                             0.0, "written back")
        cfg_back = json.loads((tmp_path / "adapter_config.json").read_text())
        assert cfg_back["layer_replication"] == SCRIPT.MAPS[kind]


def test_replicate_layers_shares_arrays_and_refuses_bad_maps():
    _, params, _, _ = tc.load("llama")
    cfg = pm.llama.load_llama(tc._GOLDEN.BASES["llama"]).config
    new, cfg2 = pm.replicate_layers(params, cfg, [[0, 2], [1, 2]])
    assert cfg2.num_hidden_layers == 3 and cfg.num_hidden_layers == 2
    assert sorted(new["layers"]) == [0, 1, 2] and sorted(params["layers"]) == [0, 1]
    for i, j in ((0, 0), (1, 1), (1, 2)):  # the same arrays, no copy
        for x, y in zip(jax.tree.leaves(params["layers"][i]),
                        jax.tree.leaves(new["layers"][j]), strict=True):
            assert x is y
    assert new["embed_tokens"] is params["embed_tokens"]
    _, scanned, _, _ = tc.load("llama", scanned=True)
    new_s, _ = pm.replicate_layers(scanned, cfg, [[0, 2], [1, 2]])
    q = new_s["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q, jnp.stack([new["layers"][j]["self_attn"]["q_proj"]
                                                ["kernel"] for j in range(3)]))
    for bad in ([], [[0, 3]], [[1, 1]], [[0, 1.0]], [[0]]):
        with pytest.raises(ValueError, match="layer_map"):
            pm.replicate_layers(params, cfg, bad)


def test_replicated_file_on_unreplicated_params_is_refused(tmp_path):
    _, params, key_map, _ = tc.load("llama")
    with pytest.raises(ValueError, match=r"layer_replication.*3 layers.*key map 2"):
        io.load_peft(GOLDEN / f"llama_{NAME}", params, key_map=key_map)
    tc.check_refused(GOLDEN, NAME, tmp_path, {"layer_replication": [[0, "2"]]})


def test_peftjax_written_replicated_lora_loads_in_peft(tmp_path):
    """``tuner_checks.check_peftjax_written``'s checks, with the replicated models."""
    report = json.loads((GOLDEN / "peft.json").read_text())
    committed = GOLDEN / "from_peftjax"
    outputs = SCRIPT.build(tmp_path)
    old_outputs = np.load(committed / "peftjax_outputs.npz")
    assert sorted(outputs) == sorted(old_outputs.files)
    for d, out in sorted(outputs.items()):
        kind = d.split("_")[1]
        new, _ = io.read_safetensors(tmp_path / d / "adapter_model.safetensors")
        old, _ = io.read_safetensors(committed / d / "adapter_model.safetensors")
        assert_tensors_close(new, old, tc.EXPORT_REL, d)
        assert json.loads((tmp_path / d / "adapter_config.json").read_text()) == \
            json.loads((committed / d / "adapter_config.json").read_text())
        rec = report[d]
        assert rec["max_abs_diff"] <= tc.TORCH_ATOL
        assert_verified_stats(rec["tensor_stats"], old, d)
        drift = float(np.max(np.abs(tc._mask(kind, out) - tc._mask(kind, old_outputs[d]))))
        assert drift + rec["max_abs_diff"] <= tc.TORCH_ATOL
        params, _, key_map, _ = SCRIPT.load(  # reads back into the replicated model
            kind, tuple(map(tuple, SCRIPT.OWN_MAPS[kind])), scanned=kind == "llama")
        back = io.load_peft(tmp_path / d, params, key_map=key_map)
        a, st = SCRIPT.BUILT[d]
        assert sorted(back.assignment) == sorted(a)
        jax.tree.map(np.testing.assert_array_equal, back.state, st)
        flat = tree.leaves_by_path(params)
        for p, x in a.items():  # the same adapters (scalings) on the same leaves
            t, f = st.trainable[p], st.frozen[p]
            np.testing.assert_allclose(back.assignment[p].apply(flat[p], t, f),
                                       x.apply(flat[p], t, f), rtol=0, atol=1e-6)
