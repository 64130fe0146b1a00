# SPDX-License-Identifier: Apache-2.0
"""Sharded training with JAX's own SPMD machinery: meshes, rules, derived shardings.

peftjax adds no distribution layer: a step is an ordinary function, jitted
with ``NamedSharding``s over a ``Mesh``; XLA's partitioner inserts the
collectives. This namespace supplies the shardings.

1. A mesh with ``data``, ``fsdp`` and ``tensor`` axes (``make_mesh``;
   ``AxisType.Auto`` axes). The batch is split over ``data`` x ``fsdp``
   (``batch_sharding``); parameters are replicated over ``data`` and split
   over ``fsdp`` and ``tensor``.
2. Base parameters get ``PartitionSpec``s from the same path rules as
   adapters and optimizers: ``Rule(where=regex, then=MatrixSpec(inputs=...,
   outputs=...))`` is resolved through the leaf's ``DimensionNumbers``, so
   it covers 2-D and stacked ``(L, in, out)`` kernels alike
   (``param_shardings``; ``transformer_rules()`` for Llama/BERT names).
3. Adapter and optimizer state are never placed by hand: ``adapter_shardings``
   and ``state_shardings`` derive each leaf's sharding from its base leaf
   (LoRA ``a`` follows the input axis, ``b`` the output axis; GaLore/FRUGAL
   bases and low-rank moments follow the surviving axis; sparse ``values``
   and ``indices`` put the base's mesh axes on ``k``). A leaf that cannot be
   split like its base raises a ``ShardingFallbackWarning``. Optimizer states
   say how to place their fields with ``peftjax.tree.StateRole`` (a
   ``state_roles`` class attribute), so any optax state, peftjax's or your
   own, is placed without this package knowing its type
   (docs/sharding_state.md).

Data parallel, FSDP and tensor parallel are the same code with different mesh
shapes::

    from peftjax import adapters, shard, train, tree
    mesh = shard.make_mesh(data=2, fsdp=4)              # 8 devices
    p_sh = shard.param_shardings(mesh, params, shard.transformer_rules())
    params = jax.device_put(params, p_sh)
    loss_fn = shard.constrain_scan_carries(loss_fn, mesh, batch_size=B)
    t = train.trainer(loss_fn, opt, adapters=assignment)
    state = t.init(key, params)
    s_sh = shard.adapter_shardings(mesh, assignment, params, p_sh,
                                   adapters.AdapterState(state.trainable, state.frozen))
    o_sh = shard.state_shardings(mesh, state.opt_state, state.trainable, s_sh.trainable)
    rep = shard.replicated(mesh)
    state = jax.device_put(state, train.TrainState(s_sh.trainable, s_sh.frozen, o_sh,
                                                   rep, rep))
    batch = jax.device_put(batch, shard.batch_sharding(mesh))
    state, metrics = t.step(state, batch, params)   # jit propagates the placements

Models that scan over stacked layers: under FSDP, XLA gives the activations
carried through the layer loop one sharding for the whole loop and, because
the sliced kernels are split on the contracted axis, replicates the batch.
Wrap the loss in ``constrain_scan_carries(loss_fn, mesh, batch_size=B)``: it
re-traces the function and pins every batch-sized ``scan`` carry to the batch
sharding, without touching model code (unrolled layers need nothing).

GaLore and FRUGAL under sharding: the SVD of a refresh needs whole matrices.
Pass ``refresh_sharding=shard.refresh_sharding(mesh)`` so that each device
refreshes its own share of a stacked leaf's layers (padded to a multiple of
the device count), or ``refresh_batch_size=1`` to gather one layer at a time;
the default batched refresh gathers every layer of a stacked gradient on
every device at once. Measured on SmolLM2-135M (global batch 8 x 128, FSDP
over 8 simulated devices, ``benchmarks/sharded_step.py``): a GaLore step holds
515 MiB per device against 3823 MiB on one device (0.135x), a LoRA step
334 MiB against 2474 MiB.

Checkpoints: ``peftjax.io.checkpoint.save`` writes sharded arrays as they are
(each process its own shards); ``restore(directory, like, shardings=...)``
places the arrays on any mesh, e.g. saved on ``(2, 4)`` and restored on
``(8, 1)`` or one device.

``jax.pmap`` (legacy): peftjax's transforms are pure functions, so a pmapped
step with ``jax.lax.pmean`` over the gradients works unchanged; pass the
replicated trees with ``in_axes=None`` instead of the removed
``jax.device_put_replicated``. New code should use ``jit`` with shardings.

Multi-host: call ``jax.distributed.initialize()`` first, build the mesh over
``jax.devices()`` (all hosts), feed each host's batch shard with
``jax.make_array_from_process_local_data(shard.batch_sharding(mesh), x)``;
the step function is unchanged (``examples/multihost/`` in the repository).

Exports: ``AXES``, ``BATCH_AXES``, ``make_mesh``, ``batch_sharding``,
``replicated``, ``refresh_sharding``, ``constrain_scan_carries``,
``MatrixSpec``, ``transformer_rules``,
``param_specs``, ``param_shardings``, ``named_shardings``,
``adapter_shardings``, ``state_shardings``, ``ShardingFallbackWarning``,
``sharding_table``.
"""

from peftjax.shard._carries import constrain_scan_carries as constrain_scan_carries
from peftjax.shard._derive import ShardingFallbackWarning as ShardingFallbackWarning
from peftjax.shard._derive import adapter_shardings as adapter_shardings
from peftjax.shard._derive import state_shardings as state_shardings
from peftjax.shard._mesh import AXES as AXES
from peftjax.shard._mesh import BATCH_AXES as BATCH_AXES
from peftjax.shard._mesh import batch_sharding as batch_sharding
from peftjax.shard._mesh import make_mesh as make_mesh
from peftjax.shard._mesh import refresh_sharding as refresh_sharding
from peftjax.shard._mesh import replicated as replicated
from peftjax.shard._specs import MatrixSpec as MatrixSpec
from peftjax.shard._specs import named_shardings as named_shardings
from peftjax.shard._specs import param_shardings as param_shardings
from peftjax.shard._specs import param_specs as param_specs
from peftjax.shard._specs import sharding_table as sharding_table
from peftjax.shard._specs import transformer_rules as transformer_rules

__all__ = [
    "AXES",
    "BATCH_AXES",
    "MatrixSpec",
    "ShardingFallbackWarning",
    "adapter_shardings",
    "batch_sharding",
    "constrain_scan_carries",
    "make_mesh",
    "named_shardings",
    "param_shardings",
    "param_specs",
    "refresh_sharding",
    "replicated",
    "sharding_table",
    "state_shardings",
    "transformer_rules",
]
