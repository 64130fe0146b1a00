# SPDX-License-Identifier: Apache-2.0
"""A peftjax-written PEFT adaption prompt for the reverse check (PEFT loads it).

Runs in the main virtualenv: NumPy-seeded prompts and non-zero gates on both
layers of the tiny Llama (``adapter_len=2``), saved with
``io.save_peft_adaption_prompt``, and their logits through
``adapters.AdaptionPromptHook`` on the fixed inputs; then
``peft_adaption_prompt_make.py`` loads the file in PEFT and records the
difference. The tests call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_adaption_prompt_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from peftjax import adapters, io  # noqa: E402
from peftjax import models as pm  # noqa: E402


def params():
    rng = np.random.default_rng(41)
    return adapters.AdaptionPromptParams(
        jnp.asarray(rng.standard_normal((2, 2, 16)), jnp.float32),
        jnp.asarray(rng.standard_normal(2) * 0.5, jnp.float32))


_APPLY = jax.jit(pm.apply, static_argnums=0)  # one compile per model and hook shape


def logits(g, base, p):
    """The tiny Llama's logits of the fixed inputs with the hook (jitted)."""
    ids = jnp.asarray(_peftjax_golden.LLAMA_IDS)
    return _APPLY(g, base, ids, hooks=adapters.AdaptionPromptHook(p, num_layers=2))


def build(out):
    g, base, _, _ = _peftjax_golden.load("llama", scanned=True)
    p = params()
    io.save_peft_adaption_prompt(pathlib.Path(out) / "pj_llama_adaption_prompt", p,
                                 num_layers=2, base_model_name_or_path="tiny-random-llama")
    return {"pj_llama_adaption_prompt": np.asarray(logits(g, base, p))}


if __name__ == "__main__":
    out = _peftjax_golden.GOLDEN / "peft_adaption_prompt" / "from_peftjax"
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "peftjax_outputs.npz", **build(out))
    for f in sorted(out.rglob("*")):
        print(f.relative_to(_peftjax_golden.GOLDEN), f.stat().st_size)
