# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT LoRA adapters with ``layer_replication`` (PEFT loads them).

Runs in the main virtualenv; then
``scripts/golden/peft_layer_replication_make.py`` loads them in PEFT (which
replicates its base the same way) and records the output differences. The
tests call :func:`build` and :func:`load`.

Usage: ``.venv/bin/python scripts/golden/peft_layer_replication_from_peftjax.py``
"""

import dataclasses
import functools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from peftjax import adapters, io, tree  # noqa: E402
from peftjax import models as pm  # noqa: E402
from peftjax.models import bert, llama  # noqa: E402

NAME = "layer_replication"
MAPS = {"llama": [[0, 2], [1, 2]], "bert": [[0, 1], [0, 2]]}  # PEFT's files' maps
OWN_MAPS = {"llama": [[1, 2], [0, 2]], "bert": [[0, 2], [1, 2]]}  # peftjax's files'
RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel",
                        then=adapters.lora(2, alpha=6.0)),
              tree.Rule(where="layers/mlp/down_proj/kernel", then=adapters.lora(3))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.lora(2, alpha=4.0))],
}


# ``{directory: (assignment, state)}`` of the last ``build`` (for read-back checks)
BUILT: dict = {}


@functools.cache
def _forward(kind: str, depth: int, scanned: bool):
    """The jitted forward of the fixed inputs for a ``depth``-layer tiny model."""
    cfg = _config(kind, depth)
    if kind == "llama":
        g, _ = nnx.split(nnx.eval_shape(lambda: llama.LlamaForCausalLM(
            cfg, scan_layers=scanned, rngs=nnx.Rngs(0))))
        ids = jnp.asarray(_peftjax_golden.LLAMA_IDS)
        return jax.jit(lambda p: pm.apply(g, p, ids))
    g, _ = nnx.split(nnx.eval_shape(lambda: bert.BertModel(cfg, rngs=nnx.Rngs(0))))
    ids = jnp.asarray(_peftjax_golden.BERT_IDS)
    mask = (ids != 0).astype(jnp.int32)
    return jax.jit(lambda p: pm.apply(g, p, ids, attention_mask=mask))


def _config(kind: str, depth: int | None = None):
    hf = io.read_json(_peftjax_golden.BASES[kind] / "config.json", "golden")
    cfg = (llama.LlamaConfig if kind == "llama" else bert.BertConfig).from_hf(hf)
    return cfg if depth is None else dataclasses.replace(cfg, num_hidden_layers=depth)


@functools.cache
def load(kind: str, layer_map: tuple, *, scanned: bool = False):
    """``(params, config, key_map, forward)`` of the replicated tiny base model."""
    _, params, _, _ = _peftjax_golden.load(kind, scanned=scanned)
    params, cfg = pm.replicate_layers(params, _config(kind), [list(p) for p in layer_map])
    key_map = (llama if kind == "llama" else bert).peft_key_map(cfg)
    return params, cfg, key_map, _forward(kind, cfg.num_hidden_layers, scanned)


def build(out, *, seed: int = 41, scale: float = 0.3) -> dict[str, np.ndarray]:
    """Writes ``out/pj_<model>_layer_replication``; returns their outputs."""
    out = pathlib.Path(out)
    result = {}
    for kind, rules in sorted(RULES.items()):
        lmap = OWN_MAPS[kind]
        params, _, key_map, fwd = load(kind, tuple(map(tuple, lmap)),
                                       scanned=kind == "llama")
        a = tree.assign(params, rules)
        st = _peftjax_golden.perturbed(adapters.init(a, jax.random.key(0), params),
                                       seed, scale)
        d = f"pj_{kind}_{NAME}"
        io.save_peft(out / d, a, st, params, key_map=key_map, layer_replication=lmap,
                     base_model_name_or_path=f"tiny-random-{kind}")
        merged = jax.jit(lambda t, f: adapters.materialize(a, params, t, f))(  # noqa: B023
            st.trainable, st.frozen)
        result[d] = np.asarray(fwd(merged))
        BUILT[d] = (a, st)
    return result


if __name__ == "__main__":
    dst = _peftjax_golden.GOLDEN / f"peft_{NAME}" / "from_peftjax"
    dst.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst / "peftjax_outputs.npz", **build(dst))
    for p in sorted(dst.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(_peftjax_golden.GOLDEN)}  {p.stat().st_size}")
