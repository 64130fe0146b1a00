# SPDX-License-Identifier: Apache-2.0
"""A peftjax-written PEFT aLoRA adapter for the reverse check (PEFT loads it).

Runs in the main virtualenv: a scanned LoRA state (NumPy-seeded values) on the
tiny Llama saved with ``save_peft(..., alora_invocation_tokens=)``, and its
logits through ``adapters.alora_hook`` on the inputs of
``peft_alora_make.py``; that script then loads the file in PEFT and records
the difference. The tests call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_alora_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from peftjax import adapters, io, tree  # noqa: E402
from peftjax import models as pm  # noqa: E402

INVOCATION = [7, 50]
IDS = [[1, 5, 7, 50, 2, 63, 7, 50, 9, 3],
       [4, 7, 50, 12, 0, 33, 17, 8, 40, 11],
       [3, 9, 40, 12, 0, 7, 5, 3, 2, 1]]
RULES = [tree.Rule(where="layers/self_attn/(k|o)_proj/kernel", then=adapters.lora(3, alpha=6.0)),
         tree.Rule(where="layers/mlp/up_proj/kernel", then=adapters.lora(3, alpha=6.0))]


def build(out):
    g, params, key_map, _ = _peftjax_golden.load("llama", scanned=True)
    a = tree.assign(params, RULES)
    st = _peftjax_golden.perturbed(adapters.init(a, jax.random.key(0), params), 41, 0.3)
    io.save_peft(pathlib.Path(out) / "pj_llama_alora", a, st, params, key_map=key_map,
                 base_model_name_or_path="tiny-random-llama", task_type="CAUSAL_LM",
                 alora_invocation_tokens=INVOCATION)
    return {"pj_llama_alora": np.asarray(logits(g, params, a, st.trainable))}


_APPLY = jax.jit(pm.apply, static_argnums=0)  # one compile per model and hook shape


def logits(g, params, assignment, trainable):
    """The tiny Llama's logits of ``IDS`` with the aLoRA hook (jitted)."""
    ids = jnp.asarray(IDS)
    hook = adapters.alora_hook(assignment, trainable, adapters.alora_starts(ids, INVOCATION),
                               num_layers=2)
    return _APPLY(g, params, ids, hooks=hook)


if __name__ == "__main__":
    out = _peftjax_golden.GOLDEN / "peft_alora" / "from_peftjax"
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "peftjax_outputs.npz", **build(out))
    for p in sorted(out.rglob("*")):
        print(p.relative_to(_peftjax_golden.GOLDEN), p.stat().st_size)
