"""Strict test configuration (docs/architecture.md#tests)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "cpu":
        return
    skip_gpu = pytest.mark.skip(reason="needs an accelerator")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def getkey():
    """Returns a function that yields fresh, deterministic PRNG keys."""
    counter = itertools.count()
    base = jax.random.key(1234)
    return lambda: jax.random.fold_in(base, next(counter))


@pytest.fixture
def tiny_params():
    """Small dict-of-arrays model covering every kernel layout we support."""
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32) * 0.3

    return {
        "embed": {"embedding": normal(11, 6)},
        "dense1": {"kernel": normal(6, 8), "bias": normal(8)},
        "attn": {"qkv": {"kernel": normal(6, 2, 4)}},  # (embed, heads, head_dim)
        "stack": {"kernel": normal(3, 8, 8)},  # (layers, in, out)
        "norm": {"scale": jnp.ones((8,), jnp.float32)},
        "dense2": {"kernel": normal(8, 5), "bias": normal(5)},
    }
