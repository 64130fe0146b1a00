"""PEFT GraLoRA (``peft_type: GRALORA``) both ways, against torch on the tiny models.

``tests/io/golden/peft_gralora/`` holds PEFT-made GraLoRA adapters with every
``gralora_*`` tensor perturbed away from its init (``scripts/golden/
peft_gralora_make.py``: hybrid GraLoRA ``k=2, hybrid_r=2`` on the Llama, a
``4 × 4`` grid on BERT), torch's outputs (active and merged), PEFT's
trainable-parameter counts, and peftjax-written adapters that PEFT loaded
(``scripts/golden/peft_gralora_from_peftjax.py``; the max output differences
and tensor statistics are in ``peft.json``).
"""

import pathlib

import jax
import pytest

from peftjax import adapters, io, tree
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_gralora"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True), ("bert", False)],
                         ids=["llama-unrolled", "llama-scanned", "bert"])
def test_peft_made_gralora_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "gralora", kind, scanned=scanned)
    if kind == "llama":  # the config's r=4, alpha=6, gralora_k=2, hybrid_r=2
        q = "layers/self_attn/q_proj/kernel" if scanned else "layers/1/self_attn/q_proj/kernel"
        assert repr(ad.assignment[q]) == "gralora(rank=4, alpha=6, gralora_k=2, hybrid_r=2)"
        assert ad.state.trainable[q].b_hybrid.shape[-2:] == (2, 16)
    else:
        assert {repr(x) for x in ad.assignment.values()} == {
            "gralora(rank=8, alpha=16, gralora_k=4, hybrid_r=0)"}


def test_peftjax_written_gralora_is_what_peft_verified(tmp_path):
    tc.check_peftjax_written(GOLDEN, "gralora", tmp_path)


def test_gralora_config_fields_not_honoured_are_refused(tmp_path):
    # fan_in_fan_out/bias only at PEFT's defaults; gralora_k and hybrid_r that
    # disagree with the file's tensors are errors naming the field.
    tc.check_refused(GOLDEN, "gralora", tmp_path, {
        "fan_in_fan_out": True, "bias": "all", "gralora_k": 4, "hybrid_r": 0})
    # one PEFT config per file: save_peft refuses two different GraLoRA configs
    _, params, key_map, _ = tc.load("llama")
    a = tree.assign(params, [
        tree.Rule(where="layers/0/self_attn/q_proj/kernel", then=adapters.gralora(4)),
        tree.Rule(where="layers/0/self_attn/v_proj/kernel",
                  then=adapters.gralora(4, gralora_k=4))])
    st = adapters.init(a, jax.random.key(0), params)
    with pytest.raises(ValueError, match="one PEFT GraLoRA adapter has one"):
        io.save_peft(tmp_path / "x", a, st, params, key_map=key_map)
