"""PEFT MonteCLoRA (LoRA files with ``monteclora_config``) both ways, against torch's
eval-mode outputs on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_monteclora_make.py`` (torch side) and
``scripts/golden/peft_monteclora_from_peftjax.py`` (peftjax side); the shared
checks are ``tests/io/tuner_checks.py``'s. The file adds the sampler's
``std_prior`` / ``expert_weights_prior`` (trainable) and ``gaussian_var_prior``
/ ``expert_weights`` (buffers) per module; training-mode draws are checked by
their distribution in ``tests/adapters/test_monteclora.py``.
"""

import pathlib

import jax
import numpy as np
import pytest

from peftjax import adapters
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_monteclora"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_monteclora_gives_torch_outputs(kind, scanned, tmp_path):
    ad = tc.check_peft_made(GOLDEN, "monteclora", kind, scanned=scanned,
                            roundtrip=tmp_path if kind == "llama" and not scanned
                            else None)
    hp = dict(next(iter(ad.assignment.values())).hyperparameters)
    assert (hp["num_samples"], hp["use_entropy"], hp["sample_scaler"]) == (
        (4, False, 1e-4) if kind == "llama" else (3, True, 3e-4))
    assert all(isinstance(f, adapters.MonteCLoRABuffers) for f in ad.state.frozen.values())
    if scanned:  # a draw on stacked leaves: one per layer, near the mean a
        t, f = jax.jit(lambda k, tr, fr: adapters.monteclora_sample(
            k, ad.assignment, tr, fr))(jax.random.key(0), *ad.state)
        for p, x in t.items():
            a0 = np.asarray(ad.state.trainable[p].a)
            assert x.a.shape == a0.shape and f[p].gaussian_var.shape == (2, 4, 4)
            assert 0 < np.abs(np.asarray(x.a) - a0).max() < 0.05


def test_monteclora_config_fields_not_honoured_are_refused(tmp_path):
    # num_samples that disagrees with the sampler tensors is an error naming it
    tc.check_refused(GOLDEN, "monteclora", tmp_path, {
        "monteclora_config": {"num_samples": 5}})


def test_peftjax_written_monteclora_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "monteclora", tmp_path)
