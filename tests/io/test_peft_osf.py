"""PEFT OSF (``peft_type: OSF``) both ways, against torch on the tiny Llama and BERT.

Goldens: ``scripts/golden/peft_osf_make.py`` (torch side) and
``scripts/golden/peft_osf_from_peftjax.py`` (peftjax side); the shared checks
are ``tests/io/tuner_checks.py``'s. PEFT's files hold only the trainable
``U_low``, ``S_low``, ``V_low``: the frozen initial factors and preserved
bases come from an SVD of the base, torch's when PEFT loads a file, JAX's when
peftjax does (the outputs depend only on sign-free products of them). The
BERT file preserves a fraction (0.25) with a ``rank_pattern`` on
``intermediate.dense``; the peftjax-written Llama file needs a
``rank_pattern`` too.
"""

import pathlib

import numpy as np
import pytest

from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_osf"


@pytest.mark.parametrize("kind,scanned", [("llama", False), ("llama", True),
                                          ("bert", False)])
def test_peft_made_osf_gives_torch_outputs(kind, scanned, tmp_path):
    roundtrip = tmp_path / "back" if (kind, scanned) == ("llama", False) else None
    ad = tc.check_peft_made(GOLDEN, "osf", kind, scanned=scanned, roundtrip=roundtrip)
    ranks = {p: t.s.shape[-1] for p, t in ad.state.trainable.items()}
    if kind == "bert":  # 16 - int(16·0.25) = 12; intermediate.dense 16 - 6 = 10
        assert {r for p, r in ranks.items() if "intermediate" in p} == {10}
        assert {r for p, r in ranks.items() if "intermediate" not in p} == {12}
    else:  # PEFT's default: half of min(in, out) preserved (v_proj 16x8: 4 of 8)
        assert {r for p, r in ranks.items() if "v_proj" in p} == {4}
        assert {r for p, r in ranks.items() if "v_proj" not in p} == {8}
    f = next(iter(ad.state.frozen.values()))  # the preserved basis is orthonormal
    hi = np.asarray(f.in_high).reshape((-1,) + f.in_high.shape[-2:])[0]
    np.testing.assert_allclose(hi.T @ hi, np.eye(hi.shape[1]), atol=1e-5)


def test_osf_config_fields_not_honoured_are_refused(tmp_path):
    tc.check_refused(GOLDEN, "osf", tmp_path, {"effective_rank": 2,
                                                "rank_pattern": {"q_proj": 3},
                                                "bias": "all"})


def test_peftjax_written_osf_loads_in_peft_with_peftjax_outputs(tmp_path):
    tc.check_peftjax_written(GOLDEN, "osf", tmp_path)
