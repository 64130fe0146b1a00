"""Generation with unmerged adapters through the factored path (issue 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored, tree
from peftjax import models as pm
from peftjax.models import llama
from tests.models.test_llama import make, make_config


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_factored_equals_merged(scan):
    cfg = make_config()
    g, params = make(cfg, scan_layers=scan)
    rule = r"layers/(\d+/)?self_attn/(q|v)_proj/kernel"
    assignment = tree.assign(params, [tree.Rule(where=rule,
                                                then=adapters.lora(4, alpha=8.0))])
    state = adapters.init(assignment, jax.random.key(0), params)
    rng = np.random.default_rng(3)
    trainable = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.3, x.dtype),
        state.trainable)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 5)), jnp.int32)

    def gen(p, prompt):
        return llama.generate(pm.rebuild(g, p), prompt, max_new_tokens=6)

    merged = adapters.fold(assignment, params, trainable, state.frozen)
    want = jax.jit(gen)(merged, prompt)
    got = jax.jit(factored.transform(gen, assignment, trainable, state.frozen))(
        params, prompt)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The adapters matter: the base model generates something else.
    base = jax.jit(gen)(params, prompt)
    assert not np.array_equal(np.asarray(base), np.asarray(want))
