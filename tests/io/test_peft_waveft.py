"""PEFT WaveFT (``peft_type: WAVEFT``) both ways, against torch on the tiny models.

``tests/io/golden/peft_waveft/`` holds PEFT-made WaveFT adapters with every
``waveft_spectrum`` perturbed away from its zero init (``scripts/golden/
peft_waveft_make.py``: ``db2`` with an ``n_frequency_pattern`` on the Llama,
``coif1`` with ``proportional_parameters`` on BERT), torch's outputs (active
and merged), PEFT's trainable-parameter counts, and peftjax-written adapters
(``db3``; ``use_idwt=False`` on BERT) that PEFT loaded (``scripts/golden/
peft_waveft_from_peftjax.py``; the max output differences and tensor
statistics are in ``peft.json``).
"""

import pathlib

import jax
import numpy as np
import pytest

from peftjax import adapters, io, tree
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_waveft"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True), ("bert", False)],
                         ids=["llama-unrolled", "llama-scanned", "bert"])
def test_peft_made_waveft_gives_torch_outputs(kind, scanned):
    ad = tc.check_peft_made(GOLDEN, "waveft", kind, scanned=scanned)
    if kind == "llama":  # n_frequency=20, n_frequency_pattern={"down_proj": 40}
        q = "layers/1/self_attn/q_proj/kernel"
        if not scanned:
            assert ad.state.trainable[q].spectrum.shape == (20,)
            assert ad.state.trainable["layers/0/mlp/down_proj/kernel"].spectrum.shape == (40,)
            np.testing.assert_array_equal(  # PEFT's positions for (out, in) = (16, 16)
                np.asarray(ad.state.frozen[q].indices),
                adapters.fourierft_indices(16, 16, 20, seed=11))
    else:  # proportional_parameters: 24 * 18 modules shared by in*out
        n = {p: int(t.spectrum.shape[0]) for p, t in ad.state.trainable.items()}
        assert sum(n.values()) == 240 and len(set(n.values())) == 2


def test_peftjax_written_waveft_is_what_peft_verified(tmp_path):
    tc.check_peftjax_written(GOLDEN, "waveft", tmp_path)


def test_waveft_config_fields_not_honoured_are_refused(tmp_path):
    # fan_in_fan_out/bias only at PEFT's defaults; a family PEFT cannot build
    # and an n_frequency that disagrees with the file are errors naming them.
    tc.check_refused(GOLDEN, "waveft", tmp_path, {
        "fan_in_fan_out": True, "bias": "all", "wavelet_family": "coif4",
        "n_frequency": 21})


def test_save_peft_needs_one_waveft_config(tmp_path):
    _, params, key_map, _ = tc.load("llama", scanned=True)
    a = tree.assign(params, [
        tree.Rule(where="layers/self_attn/q_proj/kernel", then=adapters.waveft(8)),
        tree.Rule(where="layers/self_attn/v_proj/kernel",
                  then=adapters.waveft(8, wavelet_family="db2"))])
    st = adapters.init(a, jax.random.key(0), params)
    with pytest.raises(ValueError, match="one PEFT WaveFT adapter has one scaling"):
        io.save_peft(tmp_path / "x", a, st, params, key_map=key_map)
