"""adapters._lowrank: compute_dtype, the dtype every adapter term is computed in."""

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters


@pytest.mark.parametrize("dtypes,want", [
    ((jnp.float32,), jnp.float32),
    ((jnp.bfloat16, jnp.float32), jnp.float32),
    ((jnp.bfloat16, jnp.bfloat16), jnp.bfloat16),
    ((jnp.bfloat16, jnp.float16), jnp.float32),   # same width, no common type
    ((jnp.float16, jnp.float32, jnp.bfloat16), jnp.float32),
    ((jnp.float32, jnp.float64), jnp.float64),
], ids=str)
def test_compute_dtype_is_the_widest(dtypes, want):
    assert adapters.compute_dtype(*dtypes) == jnp.dtype(want)


def test_compute_dtype_works_under_strict_promotion():
    import jax
    with jax.numpy_dtype_promotion("strict"):
        ct = adapters.compute_dtype(jnp.bfloat16, jnp.float16)
        x = jnp.ones(3, jnp.bfloat16).astype(ct) + jnp.ones(3, jnp.float16).astype(ct)
    assert x.dtype == np.float32
