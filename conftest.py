"""Doctests run under JAX's default promotion rules, as users' code does.

``tests/conftest.py`` switches JAX to strict dtype/rank promotion for the test
suite; that setting is process-global, so doctest items (collected from
``peftjax/``) that share a worker with tests restore the defaults here.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _doctest_default_promotion(request):
    if isinstance(request.node, pytest.DoctestItem):
        with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
            yield
    else:
        yield
