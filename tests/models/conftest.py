"""Shared fixtures of the model tests: SmolLM2 loaded and compiled once."""

import json
import os
import types

import jax
import numpy as np
import pytest

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


def _golden():
    with open(os.path.join(GOLDEN_DIR, "inputs.json"), encoding="utf-8") as f:
        inputs = json.load(f)
    with open(os.path.join(GOLDEN_DIR, "golden.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return inputs, meta


def passage(golden, key):
    """The Shakespeare passage ``key`` of the golden inputs, read from the fixture."""
    from peftjax import models as pm

    p = golden.inputs["passages"][key]
    with open(pm.shakespeare_texts()[p["play"]], encoding="utf-8") as f:
        text = f.read()
    start = text.index(p["first_line"])
    return text[start : start + p["n_chars"]]


@pytest.fixture(scope="session")
def golden():
    """The committed golden inputs, scalars and arrays (torch transformers)."""
    inputs, meta = _golden()
    with np.load(os.path.join(GOLDEN_DIR, "smollm2.npz")) as z:
        smol = dict(z)
    with np.load(os.path.join(GOLDEN_DIR, "minilm.npz")) as z:
        mini = dict(z)
    return types.SimpleNamespace(inputs=inputs, meta=meta, smollm2=smol, minilm=mini)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M from the offline GGUF, read once; scanned model + jitted forward.

    Fields: ``config``, ``model`` (scanned ``LlamaForCausalLM``),
    ``graphdef``/``params`` (its pure view), ``forward(params, ids, mask)``
    (jitted logits), ``tokenizer``.
    """
    from peftjax import io, tree
    from peftjax import models as pm
    from peftjax.models import llama

    gguf_file = io.read_gguf(pm.smollm2_gguf())
    config, unrolled = llama.params_from_gguf(gguf_file)
    tokenizer = pm.tokenizer_from_gguf(gguf_file.metadata)
    del gguf_file
    from flax import nnx

    abstract = nnx.eval_shape(
        lambda: llama.LlamaForCausalLM(config, scan_layers=True, rngs=nnx.Rngs(0))
    )
    model = nnx.merge(nnx.graphdef(abstract), tree.stack_layers(unrolled))
    del unrolled  # only the scanned copy is kept (about 0.5 GB)
    graphdef, params = pm.split_params(model)
    forward = jax.jit(
        lambda p, ids, mask: pm.apply(graphdef, p, ids, attention_mask=mask)
    )
    return types.SimpleNamespace(
        config=config,
        model=model,
        graphdef=graphdef,
        params=params,
        forward=forward,
        tokenizer=tokenizer,
    )
