# SPDX-License-Identifier: Apache-2.0
"""Legacy data parallelism with ``jax.pmap``: peftjax transforms inside a pmapped step.

New code should use ``jax.jit`` with shardings from ``peftjax.shard`` (the
same step function runs data-parallel, FSDP and tensor-parallel). This example
is for code bases that still use ``pmap``: adapters, the factored path and
optax transforms are pure functions, so they work unchanged inside it.

Two things differ from older pmap code:

* ``jax.device_put_replicated`` is gone from JAX; pass replicated trees
  (parameters, adapter state, optimizer state) with ``in_axes=None`` and get
  them back with ``out_axes=None`` (they are identical on every device after
  ``jax.lax.pmean`` of the gradients);
* the batch is split explicitly into ``(devices, B / devices, ...)``.

Run (8 simulated CPU devices)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/pmap_legacy.py

It trains a tiny Llama with LoRA for a few steps both ways, the pmap step and
``jit`` with ``peftjax.shard.batch_sharding`` on a data-parallel mesh, and
prints the largest parameter difference (float32 rounding only).
"""

from collections.abc import Callable
from typing import Any

import jax
import optax

AXIS = "data"


def split_batch(batch: jax.Array, n_devices: int) -> jax.Array:
    """Reshapes a global batch ``(B, ...)`` into ``(n_devices, B / n_devices, ...)``.

    Args:
      batch: the global batch.
      n_devices: ``jax.local_device_count()``.

    Returns:
      The per-device batches stacked on a leading axis.
    """
    if batch.shape[0] % n_devices:
        raise ValueError(
            f"split_batch: batch of {batch.shape[0]} rows cannot be split over "
            f"{n_devices} devices"
        )
    return batch.reshape((n_devices, batch.shape[0] // n_devices) + batch.shape[1:])


def make_pmap_step(
    assignment: dict,
    loss_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    factored: bool = True,
) -> Callable:
    """Builds a pmapped LoRA step ``(trainable, opt_state, params, frozen, batches)``.

    Args:
      assignment: ``{path: Adapter}``.
      loss_fn: ``(params, batch) -> mean loss`` over one device's batch.
      optimizer: any optax transformation over the trainable tree.
      factored: run the loss through ``peftjax.factored.transform`` (else
        ``peftjax.adapters.materialize``).

    Returns:
      ``step(trainable, opt_state, params, frozen, batches) -> (trainable,
      opt_state, loss)`` where ``batches`` is ``split_batch(batch, n)`` and
      every other argument and result is one replicated tree.
    """
    from peftjax import adapters, factored

    def step(trainable, opt_state, params, frozen, batch):
        def objective(t):
            if factored:
                return factored.transform(loss_fn, assignment, t, frozen)(params, batch)
            return loss_fn(adapters.materialize(assignment, params, t, frozen), batch)

        loss, grads = jax.value_and_grad(objective)(trainable)
        # equal per-device batches: the mean of the means is the global mean
        grads = jax.lax.pmean(grads, AXIS)
        loss = jax.lax.pmean(loss, AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.pmap(
        step,
        axis_name=AXIS,
        in_axes=(None, None, None, None, 0),
        out_axes=(None, None, None),
    )


def main(steps: int = 3) -> float:
    """Trains a tiny Llama both ways and returns the largest parameter difference."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from peftjax import adapters, shard, train, tree
    from peftjax import models as pm
    from peftjax.models import llama

    cfg = llama.tiny_config()
    gdef, params = pm.split_params(
        llama.LlamaForCausalLM(cfg, scan_layers=True, rngs=nnx.Rngs(0))
    )
    n = jax.local_device_count()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, 32)), jnp.int32)

    def loss_fn(p, toks):
        logits = pm.apply(gdef, p, toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, toks[:, 1:]
        ).mean()

    a = tree.assign(
        params,
        [tree.Rule(where=r".*(q|v)_proj/kernel", then=adapters.lora(4, alpha=8.0))],
    )
    state = adapters.init(a, jax.random.key(0), params)
    opt = optax.adamw(1e-2, eps=1e-4)

    pstep = make_pmap_step(a, loss_fn, opt)
    t_p, o_p = state.trainable, opt.init(state.trainable)
    for _ in range(steps):
        t_p, o_p, loss_p = pstep(t_p, o_p, params, state.frozen, split_batch(tokens, n))

    # The jit way: train.trainer's step (factored) with the batch split over a
    # data-parallel mesh; XLA inserts the gradient all-reduce.
    mesh = shard.make_mesh(data=n, devices=jax.local_devices())
    trainer = train.trainer(loss_fn, opt, adapters=a)
    st = trainer.init(jax.random.key(0), params, state=state)  # the pmap run's start
    batch = jax.device_put(tokens, shard.batch_sharding(mesh))
    for _ in range(steps):
        st, metrics = trainer.step(st, batch, params)
    t_j, loss_j = st.trainable, metrics["loss"]
    diff = max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(t_p), jax.tree.leaves(t_j), strict=True)
    )
    print(
        f"pmap loss {float(loss_p):.6f}, jit loss {float(loss_j):.6f}, "
        f"max |pmap - jit| over the LoRA factors: {diff:.3g}"
    )
    return diff


if __name__ == "__main__":
    main()
