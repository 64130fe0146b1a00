"""Strict test configuration (docs/architecture.md#tests)."""

import functools
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import reads_goldens

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


@functools.cache
def _module_reads_goldens(path):
    return reads_goldens(pathlib.Path(path).read_text(encoding="utf-8"))


def pytest_itemcollected(item):
    """Marks ``golden`` every test of a module that reads committed goldens.

    ``.ci/run`` runs ``-m golden`` a second time under other XLA kernels; the
    marker follows the code (``tests.helpers.reads_goldens``), so the set
    cannot drift from the tests that compare against committed outputs.
    """
    path = pathlib.Path(str(item.path))
    if (
        path.suffix == ".py"
        and path.name.startswith("test_")
        and path.name != "test_hygiene.py"  # it names golden directories, reads none
        and _module_reads_goldens(str(path))
    ):
        item.add_marker(pytest.mark.golden)


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
