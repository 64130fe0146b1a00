# SPDX-License-Identifier: Apache-2.0
"""Shared peftjax-side code of the per-tuner PEFT golden scripts.

Runs in the main virtualenv. ``build(out, name, rules)`` writes, for each
model of ``rules``, ``out/pj_<model>_<name>/`` with ``peftjax.io.save_peft``
from adapters whose every trainable value is NumPy-seeded (no JAX random
bits, so the files are the same on any machine up to float32 rounding),
and returns peftjax's outputs of the fixed inputs (Llama logits, BERT last
hidden states). The Llama is built in the scanned layout (the PEFT-made
files are read in both layouts by the tests). ``main(name, rules)`` writes
them under ``tests/io/golden/peft_<name>/from_peftjax/`` with
``peftjax_outputs.npz``; the torch script (``_peft_golden.run``) then loads
them in PEFT and records the output differences; the tests call ``build``
again and compare within a stated tolerance.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import bert, llama

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests" / "io" / "golden"
BASES = {"llama": GOLDEN / "peft" / "llama_base", "bert": GOLDEN / "peft" / "bert_base"}
LLAMA_IDS = [[1, 5, 9, 33, 2, 63, 17, 8], [4, 4, 40, 12, 0, 7, 50, 3]]
BERT_IDS = [[2, 7, 11, 30, 3, 0], [2, 9, 5, 3, 0, 0]]


@functools.cache
def load(kind: str, *, scanned: bool = False):
    """``(graph, params, key_map, forward)`` of a committed tiny base model.

    ``forward(params) -> outputs`` of the fixed inputs (Llama logits, BERT
    last hidden states, every position), jitted. Cached: one load and one
    forward compile per process (the tests share them across tuners).
    """
    if kind == "llama":
        model = llama.load_llama(BASES[kind], scan_layers=scanned)
        g, params = pm.split_params(model)
        ids = jnp.asarray(LLAMA_IDS)
        return (g, params, llama.peft_key_map(model.config),
                jax.jit(lambda p: pm.apply(g, p, ids)))
    enc = bert.load_bert(BASES[kind])
    g, params = pm.split_params(enc)
    ids = jnp.asarray(BERT_IDS)
    mask = (ids != 0).astype(jnp.int32)
    return (g, params, bert.peft_key_map(enc.config),
            jax.jit(lambda p: pm.apply(g, p, ids, attention_mask=mask)))


def perturbed(state: adapters.AdapterState, seed: int, scale: float
              ) -> adapters.AdapterState:
    """Every trainable value set to ``N(0, scale²)`` NumPy draws (tree order)."""
    rng = np.random.default_rng(seed)
    trainable = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(np.shape(x)) * scale, x.dtype),
        state.trainable)
    return adapters.AdapterState(trainable, state.frozen)


def build(out, name: str, rules: dict, *, seed: int = 41, scale: float = 0.3,
          save_kwargs: dict | None = None, perturb=None) -> dict[str, np.ndarray]:
    """Writes ``out/pj_<model>_<name>`` per model; returns their outputs.

    Args:
      out: the directory to write into.
      name: the tuner (``"hira"``).
      rules: ``{"llama" | "bert": [tree.Rule, ...]}`` over the model's params
        (the Llama's are scanned: ``layers/self_attn/q_proj/kernel``).
      seed: of the NumPy generator.
      scale: standard deviation of the trainable values.
      save_kwargs: extra keyword arguments of ``io.save_peft``.
      perturb: ``(state, rng) -> state`` instead of ``perturbed`` (for
        trainable values with a constraint).

    Returns:
      ``{"pj_<model>_<name>": outputs}``.
    """
    out = pathlib.Path(out)
    result = {}
    for kind, kind_rules in sorted(rules.items()):
        _, params, key_map, fwd = load(kind, scanned=kind == "llama")
        a = tree.assign(params, kind_rules)
        st = adapters.init(a, jax.random.key(0), params)
        st = (perturbed(st, seed, scale) if perturb is None
              else perturb(st, np.random.default_rng(seed)))
        d = f"pj_{kind}_{name}"
        io.save_peft(out / d, a, st, params, key_map=key_map,
                     base_model_name_or_path=f"tiny-random-{kind}",
                     **(save_kwargs or {}))
        merged = jax.jit(lambda t, f: adapters.materialize(a, params, t, f))(  # noqa: B023
            st.trainable, st.frozen)
        result[d] = np.asarray(fwd(merged))
    return result


def main(name: str, rules: dict, **kwargs) -> None:
    """Writes ``tests/io/golden/peft_<name>/from_peftjax/`` (``build`` + outputs)."""
    out = GOLDEN / f"peft_{name}" / "from_peftjax"
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "peftjax_outputs.npz", **build(out, name, rules, **kwargs))
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(GOLDEN)}  {p.stat().st_size}")
