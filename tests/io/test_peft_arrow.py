"""PEFT Arrow (+ GenKnowSub) on the tiny Llama: ``io.load_arrow`` over PEFT LoRA
directories gives ``create_arrow_model``'s logits and prototypes.

Golden: ``scripts/golden/peft_arrow_make.py`` (three task and two general
perturbed LoRAs; routers ``arrow`` and ``gks``). Arrow has no file of its own.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io
from peftjax import models as pm
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_arrow"
CONFIGS = {"arrow": adapters.ArrowConfig(2, 0.5, False, 0),
           "gks": adapters.ArrowConfig(2, 1.0, True, 0)}


def _experts(cfg, key_map):
    return io.load_arrow([GOLDEN / f"task_{i}" for i in range(3)], key_map, cfg,
                         general_paths=[GOLDEN / "general_0", GOLDEN / "general_1"])


@pytest.mark.parametrize("name", ["arrow", "gks"])
def test_peft_arrow_logits_and_prototypes(name):
    g, params, key_map, _ = tc.load("llama", scanned=True)
    ref = np.load(GOLDEN / "torch_outputs.npz")
    cfg = CONFIGS[name]
    ex = _experts(cfg, key_map)
    for site, pr in ex.prototypes.items():
        for i in range(2):
            np.testing.assert_allclose(
                pr[i], ref[f"llama_{name}_protos/model/layers/{i}/{site}"], atol=1e-5)
    f = jax.jit(lambda p, e: pm.apply(g, p, jnp.asarray(tc._GOLDEN.LLAMA_IDS),
                                      hooks=adapters.ArrowHook(e, cfg)))
    tc.assert_outputs_close("llama", f(params, ex), ref[f"llama_{name}"])
    assert np.abs(ref[f"llama_{name}"] - ref["llama_base"]).max() > 0.5
    if name == "arrow":
        # the exact prototypes (rng_seed=None) agree up to sign where PEFT's
        # 15 power iterations converged, and are unit singular vectors
        exact = _experts(cfg._replace(rng_seed=None), key_map)
        cos = np.abs(np.sum(np.asarray(exact.prototypes["self_attn/v_proj"])
                            * np.asarray(ex.prototypes["self_attn/v_proj"]), -1))
        np.testing.assert_allclose(cos, 1.0, atol=1e-4)
        a = np.asarray(exact.lora_a["mlp/down_proj"][0, 0], np.float64)
        b = np.asarray(exact.lora_b["mlp/down_proj"][0, 0], np.float64)
        u = np.linalg.svd(a @ b)[0][:, 0]
        np.testing.assert_allclose(abs(u @ np.asarray(exact.prototypes["mlp/down_proj"][0, 0])),
                                   1.0, atol=1e-5)
        with pytest.raises(ValueError, match="use_gks=True needs general LoRAs"):
            io.load_arrow([GOLDEN / "task_0"], key_map, CONFIGS["gks"])
