# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT FRoD adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv; then ``scripts/golden/peft_frod_make.py`` loads
them in PEFT and records the output differences. The tests call
:func:`build`. PEFT computes ``U`` from the basis it regenerates from the base
weights and only then takes ``V`` from the file, so a file loads right in
PEFT only with PEFT's own bases: these adapters start from the PEFT-made
files (read by ``load_peft``, bases and patterns kept), get new NumPy-seeded
``λ`` and ``S`` values (as after training) and are written by ``save_peft``.

Usage: ``.venv/bin/python scripts/golden/peft_frod_from_peftjax.py``
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, io  # noqa: E402

SRC = _peftjax_golden.GOLDEN / "peft_frod"


def _trained(state, rng):
    """``λ + N(0, 0.2²)`` and new ``S`` values ``N(0, 0.3²)`` (path order)."""
    out = {}
    for path, t in sorted(state.trainable.items()):
        out[path] = adapters.FRoDParams(
            t.lambda_l + jnp.asarray(rng.standard_normal(t.lambda_l.shape) * 0.2,
                                     t.lambda_l.dtype),
            jnp.asarray(rng.standard_normal(t.s_values.shape) * 0.3, t.s_values.dtype))
    return adapters.AdapterState(out, state.frozen)


def build(out, seed=43):
    out = pathlib.Path(out)
    result = {}
    for kind in ("bert", "llama"):
        _, params, key_map, fwd = _peftjax_golden.load(kind, scanned=kind == "llama")
        ad = io.load_peft(SRC / f"{kind}_frod", params, key_map=key_map)
        st = _trained(ad.state, np.random.default_rng(seed))
        d = f"pj_{kind}_frod"
        io.save_peft(out / d, ad.assignment, st, params, key_map=key_map,
                     base_model_name_or_path=f"tiny-random-{kind}")
        merged = jax.jit(lambda t, f: adapters.materialize(ad.assignment, params, t, f))(  # noqa: B023
            st.trainable, st.frozen)
        result[d] = np.asarray(fwd(merged))
    return result


if __name__ == "__main__":
    dest = SRC / "from_peftjax"
    dest.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dest / "peftjax_outputs.npz", **build(dest))
    for p in sorted(dest.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(_peftjax_golden.GOLDEN)}  {p.stat().st_size}")
