# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT X-LoRA directories (the reverse of peft_xlora_make.py).

Runs in the main virtualenv: the PEFT-made ``deep`` and ``flat`` configs'
experts are read with ``io.load_peft_xlora`` and every expert and classifier
value replaced by NumPy-seeded N(0, 0.3²) draws (experts' scalings kept),
then written with ``io.save_peft_xlora`` under
``tests/io/golden/peft_xlora/from_peftjax/`` with peftjax's logits. Then run
``.venv-torch/bin/python scripts/golden/peft_xlora_make.py`` again: PEFT
loads them and records the differences in ``peft.json``.

Usage: ``.venv/bin/python scripts/golden/peft_xlora_from_peftjax.py``
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, io

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests" / "io" / "golden"
LLAMA_IDS = [[1, 5, 9, 33, 2, 63, 17, 8], [4, 4, 40, 12, 0, 7, 50, 3]]


def build(out, name: str, load) -> np.ndarray:
    """Writes ``out/pj_llama_xlora_<name>``; returns peftjax's logits."""
    g, params, key_map, _ = load("llama", scanned=True)
    clf, ex, cfg = io.load_peft_xlora(GOLDEN / "peft_xlora" / f"llama_xlora_{name}",
                                      key_map)
    rng = np.random.default_rng(41)
    draw = lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.3, x.dtype)  # noqa: E731
    clf = jax.tree.map(draw, clf)
    ex = ex._replace(lora_a=jax.tree.map(draw, ex.lora_a),
                     lora_b=jax.tree.map(draw, ex.lora_b))
    # the padded ranks become real: every expert writes the largest rank
    # (scaling kept), so PEFT reads the same numbers
    io.save_peft_xlora(pathlib.Path(out) / f"pj_llama_xlora_{name}", clf, ex, cfg,
                       key_map, base_model_name_or_path="tiny-random-llama")
    fwd = jax.jit(lambda t: adapters.xlora_forward(g, params, t, clf, ex, cfg)[0])
    return np.asarray(fwd(jnp.asarray(LLAMA_IDS)))


def main() -> None:
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import _peftjax_golden

    out = GOLDEN / "peft_xlora" / "from_peftjax"
    out.mkdir(parents=True, exist_ok=True)
    res = {f"pj_llama_xlora_{n}": build(out, n, _peftjax_golden.load)
           for n in ("deep", "flat")}
    np.savez_compressed(out / "peftjax_outputs.npz", **res)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(GOLDEN)}  {p.stat().st_size}")


if __name__ == "__main__":
    main()
