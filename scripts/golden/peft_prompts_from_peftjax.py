# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT prompt-learning adapters for the reverse check.

Runs in the main virtualenv. ``build(out)`` writes ``out/pj_llama_<name>/``
with ``peftjax.io.save_peft_prompt`` for each prompt-learning method, from
parameters whose trainable values are NumPy-seeded, and returns peftjax's
logits of the fixed inputs (MPT with task ids ``MPT_TASKS``);
``scripts/golden/peft_prompts_make.py`` then loads them in PEFT and records
the differences. ``model_kwargs`` turns a loaded ``PeftPrompt`` into the
Llama's ``prompt_embeddings=`` / ``prefix=`` arguments (the tests use it).

Usage: ``.venv/bin/python scripts/golden/peft_prompts_from_peftjax.py``
(then the torch script again).
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, io  # noqa: E402
from peftjax import models as pm  # noqa: E402

MPT_TASKS = [2, 0]
CPT_IDS = [5, 9, 11, 3, 20, 7, 30]
CPT_TYPES = [1, 2, 2, 3, 4, 5, 6]
CPT_FIELDS = {"cpt_token_ids": CPT_IDS, "cpt_tokens_type_mask": CPT_TYPES,
              "opt_projection_epsilon": 2.0, "opt_projection_format_epsilon": 1.0}


TYPES = {"prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING",
         "prefix_projection": "PREFIX_TUNING", "p_tuning_mlp": "P_TUNING",
         "p_tuning_lstm": "P_TUNING", "multitask_prompt_tuning": "MULTITASK_PROMPT_TUNING",
         "cpt": "CPT", "cartridge": "CARTRIDGE"}


def model_kwargs(peft_type: str, params, config: dict, task_ids=MPT_TASKS) -> dict:
    """The Llama's keyword arguments for a prompt-learning parameter set."""
    if peft_type in ("PROMPT_TUNING", "P_TUNING"):
        if isinstance(params, (adapters.PTuningMLP, adapters.PTuningLSTM)):
            return {"prompt_embeddings": adapters.p_tuning_prompt(params)}
        return {"prompt_embeddings": params.embeddings}
    if peft_type == "CPT":
        eps = {"epsilon": config.get("opt_projection_epsilon", 0.1),
               "format_epsilon": config.get("opt_projection_format_epsilon", 0.1)}
        return {"prompt_embeddings": adapters.cpt_prompt(
            params, config["cpt_tokens_type_mask"], **eps)}
    if peft_type == "MULTITASK_PROMPT_TUNING":
        return {"prompt_embeddings": adapters.multitask_prompt(params, jnp.asarray(task_ids))}
    if peft_type == "CARTRIDGE":
        return {"prefix": adapters.cartridge_kv(params)}
    if isinstance(params, adapters.PrefixProjection):
        kv = config["num_attention_heads"]
        return {"prefix": adapters.prefix_kv(params, num_layers=config["num_layers"],
                                             num_kv_heads=kv,
                                             head_dim=config["token_dim"] // kv)}
    return {"prefix": params}


def llama_logits(**kwargs) -> np.ndarray:
    """Tiny-Llama logits of the fixed inputs with prompt/prefix arguments."""
    g, params, _, _ = _peftjax_golden.load("llama")
    ids = jnp.asarray(_peftjax_golden.LLAMA_IDS)
    return np.asarray(pm.apply(g, params, ids, **kwargs))


def _draw(rng, x, scale=0.3):
    return jnp.asarray(rng.standard_normal(np.shape(x)) * scale, jnp.float32)


def made(seed: int = 41) -> dict:
    """``{name: (params, save fields)}``: NumPy-seeded parameters per method."""
    g, params, _, _ = _peftjax_golden.load("llama")
    table = params["embed_tokens"]["embedding"]
    rng = np.random.default_rng(seed)
    key = jax.random.key(0)

    def redraw(p):
        return jax.tree.map(lambda x: _draw(rng, x), p)

    geo = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4}
    cpt = adapters.cpt(CPT_IDS, table)
    return {
        "prompt_tuning": (redraw(adapters.prompt_tuning(key, 3, table)), {}),
        "prefix_tuning": (redraw(adapters.prefix_tuning(key, 3, **geo)), {}),
        "prefix_projection": (redraw(adapters.prefix_tuning(
            key, 3, **geo, hidden_size=8, projection_hidden=6)),
            {"num_layers": 2, "num_attention_heads": 2, "token_dim": 8}),
        "p_tuning_mlp": (redraw(adapters.p_tuning(key, 3, 16, 6)), {}),
        "p_tuning_lstm": (redraw(adapters.p_tuning(key, 3, 16, 5, encoder="lstm")), {}),
        "multitask_prompt_tuning": (redraw(adapters.multitask_prompt_tuning(
            key, 3, table, num_tasks=3, rank=2)), {}),
        "cpt": (cpt._replace(delta=_draw(rng, cpt.delta)), dict(CPT_FIELDS)),
        "cartridge": (redraw(adapters.cartridge(key, 4, **geo)), {}),
    }


def build(out) -> dict[str, np.ndarray]:
    """Writes ``out/pj_llama_<name>`` per method; returns their logits."""
    out = pathlib.Path(out)
    result = {}
    for name, (p, fields) in made().items():
        d = out / f"pj_llama_{name}"
        io.save_peft_prompt(d, p, fields=fields, base_model_name_or_path="tiny-random-llama")
        ptype = TYPES[name]
        result[d.name] = llama_logits(**model_kwargs(ptype, p, fields))
    return result


if __name__ == "__main__":
    dst = _peftjax_golden.GOLDEN / "peft_prompts" / "from_peftjax"
    dst.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst / "peftjax_outputs.npz", **build(dst))
    for f in sorted(dst.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(_peftjax_golden.GOLDEN)}  {f.stat().st_size}")
