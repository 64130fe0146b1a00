"""PEFT TinyLoRA (``peft_type: TINYLORA``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_tinylora_make.py`` (torch side) and
``scripts/golden/peft_tinylora_from_peftjax.py`` (peftjax side); the checks
are ``tests/io/tuner_checks.py``'s, plus: the frozen SVD factors and
projections are the file's (transposed for kernels, as stored for the BERT
word-embedding table) and ``tinylora_v.<i>`` goes to the module PEFT numbers
``i`` (torch's module order; the BERT file is tied, ``weight_tying=0.5``: its
modules read ``tinylora_v.<group>`` from one shared table).
"""

import pathlib

import jax
import numpy as np
import pytest

from peftjax import adapters, io
from peftjax.io import _peft_tinylora
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_tinylora"

# PEFT's numbering of the adapted modules (its _build_target_key_mapping over
# named_modules(), printed with peft 0.21.2): tinylora_v.<i> is module i.
_LAYER = {"llama": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],
          "bert": ["attention.self.query", "attention.self.value",
                   "attention.output.dense", "intermediate.dense", "output.dense"]}
PEFT_ORDER = {
    "llama": [f"model.layers.{i}.{m}" for i in range(2) for m in _LAYER["llama"]],
    "bert": ["embeddings.word_embeddings"] + [
        f"encoder.layer.{i}.{m}" for i in range(2) for m in _LAYER["bert"]],
}
_PATHS = {"self_attn.q_proj": "self_attn/q_proj", "self_attn.v_proj": "self_attn/v_proj",
          "mlp.down_proj": "mlp/down_proj", "attention.self.query": "attention/query",
          "attention.self.value": "attention/value",
          "attention.output.dense": "attention/output",
          "intermediate.dense": "intermediate", "output.dense": "output"}


def _leaf(state, module, scanned):
    """``(trainable, frozen)`` of one PEFT module in a loaded state."""
    if module == "embeddings.word_embeddings":
        path, layer = "embeddings/word_embeddings/embedding", None
    else:
        parts = module.split(".")
        layer = int(parts[2])
        sub = _PATHS[".".join(parts[3:])]
        path = (f"layers/{sub}/kernel" if scanned else f"layers/{layer}/{sub}/kernel")
    t, f = state.trainable[path], state.frozen[path]
    if scanned and layer is not None:
        t, f = jax.tree.map(lambda x: x[layer], (t, f))
    return t, f


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_tinylora_gives_torch_outputs(kind, scanned):
    # BERT's word-embedding table is a gather: the factored path materialises it
    ad = tc.check_peft_made(GOLDEN, "tinylora", kind, scanned=scanned,
                            fallback=kind == "bert")
    order = PEFT_ORDER[kind]
    assert _peft_tinylora.torch_order(sorted(order)) == order
    t, _ = io.read_safetensors(GOLDEN / f"{kind}_tinylora" / "adapter_model.safetensors")
    # PEFT's groups: 11 BERT modules at weight_tying=0.5 share 6 vectors
    groups = (list(range(6)) + [5] * 5 if kind == "bert" else list(range(len(order))))
    assert adapters.tinylora_groups(len(order), 0.5 if kind == "bert" else 0.0
                                    ).tolist() == groups
    assert sorted(k for k in t if "tinylora_v" in k) == sorted(
        f"base_model.tinylora_v.{g}" for g in set(groups))
    for module, g in zip(order, groups, strict=True):
        a_t, b_t, p_t = (t[f"base_model.model.{module}.tinylora_{x}"] for x in "ABP")
        tr, fr = _leaf(ad.state, module, scanned)
        want = ((b_t, a_t, p_t) if "embeddings" in module
                else (a_t.T, b_t.T, p_t.transpose(0, 2, 1)))
        v = (tr.v if kind == "llama"  # tied: the module's row of the shared table
             else ad.state.trainable[adapters.SHARED]["tinylora"][int(fr.group)])
        np.testing.assert_array_equal(np.asarray(v), t[f"base_model.tinylora_v.{g}"],
                                      err_msg=module)
        for got, w in zip(fr[:3], want, strict=True):  # copies, no arithmetic
            np.testing.assert_array_equal(np.asarray(got), w, err_msg=module)
    with pytest.raises(ValueError, match="'transformer.h.0.attn.c_attn' has the unknown"):
        _peft_tinylora.torch_order(["transformer.h.0.attn.c_attn"])


def test_tinylora_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "tinylora", tmp_path, {
        "save_projection": False, "tinylora_dropout": 0.1,
        "fan_in_fan_out": True, "u": 4})


def test_peftjax_written_tinylora_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "tinylora", tmp_path)
