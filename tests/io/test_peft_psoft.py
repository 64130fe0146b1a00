"""PEFT PSOFT (``peft_type: PSOFT``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_psoft_make.py`` (torch side) and
``scripts/golden/peft_psoft_from_peftjax.py`` (peftjax side); the shared
checks are ``tests/io/tuner_checks.py``'s. The files hold only the rotation's
parameters; ``load_peft`` recomputes the SVD factors from the base weights,
as PEFT does. The Llama file is strict PSOFT (exact Cayley) with both
scales, the BERT one ``pissa_init`` with the Cayley-Neumann series and
``mag_b`` only.
"""

import pathlib
import warnings

import numpy as np
import pytest

from peftjax import adapters
from tests import helpers as h
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_psoft"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_psoft_gives_torch_outputs(kind, scanned, tmp_path):
    # the targets are modules where JAX's and torch's SVD signs agree here; the
    # reader says that this is not so in general
    with pytest.warns(UserWarning, match="PSOFT files hold no singular vectors"):
        ad = tc.check_peft_made(GOLDEN, "psoft", kind, scanned=scanned,
                                roundtrip=tmp_path if kind == "llama" and not scanned
                                else None)
    a = next(iter(ad.assignment.values()))
    assert repr(a) == ("psoft(rank=4, alpha=8.0)" if kind == "llama" else
                       "psoft(rank=3, alpha=6.0, init='pissa_init', mag_a=False, "
                       "use_cayley_neumann=True, num_cayley_neumann_terms=4, "
                       "cayley_neumann_eps=0.9)")
    if kind == "llama":  # strict PSOFT: orthonormal a, orthogonal Cayley R (scales aside)
        for p, f in ad.state.frozen.items():
            a_ = h.f64(f.a).reshape((-1,) + f.a.shape[-2:])[0]
            np.testing.assert_allclose(a_.T @ a_, np.eye(4), atol=1e-5)
            q = ad.state.trainable[p].weight.reshape(-1, 6)[0]
            rot = h.f64(adapters.psoft_rotation(adapters.PSOFTParams(q)))
            np.testing.assert_allclose(rot.T @ rot, np.eye(4), atol=1e-5)


def test_psoft_config_fields_not_honoured_are_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "load_peft: PSOFT files")
        tc.check_refused(GOLDEN, "psoft", tmp_path, {"psoft_svd": "lowrank",
                                                     "fan_in_fan_out": True})


def test_peftjax_written_psoft_loads_in_peft_with_peftjax_outputs(tmp_path):
    with pytest.warns(UserWarning, match="PSOFT files hold no singular vectors"):
        tc.check_peftjax_written(GOLDEN, "psoft", tmp_path)
