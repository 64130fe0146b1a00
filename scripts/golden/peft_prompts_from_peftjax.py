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

import functools
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


@functools.cache
def _forward():
    g, params, _, _ = _peftjax_golden.load("llama")
    ids = jnp.asarray(_peftjax_golden.LLAMA_IDS)
    return jax.jit(lambda kw: pm.apply(g, params, ids, **kw))


def llama_logits(**kwargs) -> np.ndarray:
    """Tiny-Llama logits of the fixed inputs with prompt/prefix arguments (jitted)."""
    emb = kwargs.get("prompt_embeddings")
    if emb is not None and emb.ndim == 2:  # one compile per prompt length
        kwargs["prompt_embeddings"] = jnp.broadcast_to(
            emb[None], (len(_peftjax_golden.LLAMA_IDS),) + emb.shape)
    if "prefix" in kwargs:  # any object with keys/values -> a PrefixParams pytree
        kwargs["prefix"] = adapters.PrefixParams(kwargs["prefix"].keys,
                                                 kwargs["prefix"].values)
    return np.asarray(_forward()(kwargs))


def made(seed: int = 41) -> dict:
    """``{name: (params, save fields)}``: NumPy-seeded parameters per method.

    Built from their shapes (no JAX random bits and no factory compiles).
    """
    _, params, _, _ = _peftjax_golden.load("llama")
    table = params["embed_tokens"]["embedding"]
    rng = np.random.default_rng(seed)

    def r(*shape):
        return jnp.asarray(rng.standard_normal(shape) * 0.3, jnp.float32)

    def lstm_layer(fan_in, h):
        return adapters.LSTMLayer(r(fan_in, 4 * h), r(h, 4 * h), r(4 * h), r(4 * h))

    kv = (2, 3, 2, 4)  # (L, P, KV, D)
    cpt = adapters.cpt(CPT_IDS, table)
    return {
        "prompt_tuning": (adapters.PromptParams(r(3, 16)), {}),
        "prefix_tuning": (adapters.PrefixParams(r(*kv), r(*kv)), {}),
        "prefix_projection": (adapters.PrefixProjection(r(3, 8), r(8, 6), r(6), r(6, 32),
                                                        r(32)),
                              {"num_layers": 2, "num_attention_heads": 2, "token_dim": 8}),
        "p_tuning_mlp": (adapters.PTuningMLP(r(3, 16), r(16, 6), r(6), r(6, 6), r(6),
                                             r(6, 16), r(16)), {}),
        "p_tuning_lstm": (adapters.PTuningLSTM(
            r(3, 16), (lstm_layer(16, 5), lstm_layer(10, 5)),
            (lstm_layer(16, 5), lstm_layer(10, 5)), r(10, 10), r(10), r(10, 16), r(16)), {}),
        "multitask_prompt_tuning": (adapters.MultitaskPromptParams(
            r(3, 16), r(3, 3, 2), r(3, 2, 16)), {}),
        "cpt": (cpt._replace(delta=r(7, 16)), dict(CPT_FIELDS)),
        "cartridge": (adapters.CartridgeParams(
            adapters.PrefixParams(r(2, 1, 2, 4), r(2, 1, 2, 4)),
            adapters.PrefixParams(r(2, 3, 2, 4), r(2, 3, 2, 4))), {}),
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
