# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT Poly files (the reverse direction of peft_poly_make.py).

Runs in the main virtualenv: ``adapters.poly_init`` on the tiny Llama
(scanned; MHR, ``n_splits=2``) and the tiny BERT with the make script's
configs, every value replaced by NumPy-seeded N(0, 0.3²) draws, written with
``io.save_peft_poly`` under ``tests/io/golden/peft_poly/from_peftjax/`` with
peftjax's outputs (eval routing, the make script's task ids). Then run
``.venv-torch/bin/python scripts/golden/peft_poly_make.py`` again: PEFT
loads them and records the differences in ``peft.json``.

Usage: ``.venv/bin/python scripts/golden/peft_poly_from_peftjax.py``
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, io
from peftjax import models as pm

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests" / "io" / "golden"
TASK_IDS = {"llama": [2, 0], "bert": [1, 0]}
CONFIGS = {
    "llama": dict(r=2, n_tasks=3, n_skills=3, n_splits=2,
                  target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "bert": dict(r=2, n_tasks=2, n_skills=2, n_splits=1,
                 target_modules=["query", "value", "dense"]),
}


def build(out, kind: str, load, *, forward: bool = True) -> np.ndarray | None:
    """Writes ``out/pj_<kind>_poly``; returns peftjax's outputs of the fixed
    inputs (``None`` without ``forward``)."""
    g, params, key_map, _ = load(kind, scanned=kind == "llama")
    pp = adapters.poly_init(jax.random.key(0), params, **CONFIGS[kind])
    rng = np.random.default_rng(41)
    pp = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.3,
                                            x.dtype), pp)
    io.save_peft_poly(pathlib.Path(out) / f"pj_{kind}_poly", pp, key_map,
                      base_model_name_or_path=f"tiny-random-{kind}")
    if not forward:
        return None
    if kind == "llama":
        ids, kw = jnp.asarray([[1, 5, 9, 33, 2, 63, 17, 8], [4, 4, 40, 12, 0, 7, 50, 3]]), {}
    else:
        ids = jnp.asarray([[2, 7, 11, 30, 3, 0], [2, 9, 5, 3, 0, 0]])
        kw = {"attention_mask": (ids != 0).astype(jnp.int32)}
    fwd = jax.jit(lambda p, pp, t: pm.apply(g, p, ids, hooks=adapters.PolyHook(pp, t),
                                            **kw))
    return np.asarray(fwd(params, pp, jnp.asarray(TASK_IDS[kind])))


def main() -> None:
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import _peftjax_golden

    out = GOLDEN / "peft_poly" / "from_peftjax"
    out.mkdir(parents=True, exist_ok=True)
    res = {f"pj_{k}_poly": build(out, k, _peftjax_golden.load) for k in CONFIGS}
    np.savez_compressed(out / "peftjax_outputs.npz", **res)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(GOLDEN)}  {p.stat().st_size}")


if __name__ == "__main__":
    main()
