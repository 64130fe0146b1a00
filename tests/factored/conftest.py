"""Model zoo for the factored-path tests: (apply_fn, params, x, targets)."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from peftjax.models import apply as llama_apply
from peftjax.models import llama, split_params
from peftjax.tree import DimensionNumbers as DN
from tests.factored import _models

LLAMA_CFG = llama.tiny_config(vocab_size=32, hidden_size=16, intermediate_size=32,
                              tie_word_embeddings=False)


def _llama(scan):
    m = llama.LlamaForCausalLM(LLAMA_CFG, scan_layers=scan, remat=scan,
                               rngs=nnx.Rngs(0))
    g, p = split_params(m)
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 32)
    layer = "layers" if scan else r"layers/\d+"
    targets = {f"{layer}/self_attn/(q|k|v|o)_proj/kernel": None,
               f"{layer}/mlp/down_proj/kernel": None}
    return (lambda p, t: llama_apply(g, p, t)), p, tokens, targets


def _stock_targets(prefix, scanned):
    b = (0,) if scanned else ()
    o = len(b)
    return {
        f"{prefix}/(q|k|v)/kernel": DN(reduction_axis=o, output_axis=(o + 1, o + 2),
                                      batch_axis=b),
        f"{prefix}/o/kernel": DN(reduction_axis=(o, o + 1), output_axis=o + 2,
                                 batch_axis=b),
        # (L, in, out) is not guessed: a third-party scanned model declares it.
        f"{prefix}/up/kernel": DN(reduction_axis=o, output_axis=o + 1, batch_axis=b)
        if scanned else None,
        f"{prefix}/down/kernel": DN(reduction_axis=o + 1, output_axis=o, batch_axis=b),
    }


def _linen(variant):
    model = _models.LinenModel(variant=variant)
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    variables = model.init(jax.random.key(0), x)
    prefix = "params/blocks" if variant == "scan" else r"params/blocks_\d"
    return model.apply, variables, x, _stock_targets(prefix, variant == "scan")


def _nnx(variant):
    model = _models.NNXModel(variant, rngs=nnx.Rngs(0))
    g, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    prefix = "blocks" if variant == "scan" else r"blocks/\d"
    return ((lambda p, x: nnx.merge(g, p)(x)), params, x,
            _stock_targets(prefix, variant == "scan"))


MODELS = {
    "llama": lambda: _llama(False),
    "llama_scan_remat": lambda: _llama(True),
    "linen": lambda: _linen("plain"),
    "linen_scan": lambda: _linen("scan"),
    "linen_remat": lambda: _linen("remat"),
    "nnx": lambda: _nnx("plain"),
    "nnx_scan_remat": lambda: _nnx("scan"),
}


@functools.cache
def build(name):
    """Builds (once per session) ``(apply_fn, params, x, targets)`` for ``name``."""
    return MODELS[name]()


@pytest.fixture(params=sorted(MODELS))
def zoo(request):
    return request.param, build(request.param)


def scalar_loss(y):
    return jnp.sum(jnp.square(y.astype(jnp.float32)))
