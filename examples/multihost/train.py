# SPDX-License-Identifier: Apache-2.0
"""Multi-host LoRA training with peftjax: one global mesh, the same step function.

Every process runs this script. ``jax.distributed.initialize`` connects them;
afterwards ``jax.devices()`` lists every process's devices, the mesh spans
all of them (``data`` across processes, ``fsdp`` within each), and the step
function is exactly the single-host one: ``train.trainer``'s jitted step on a
state placed with shardings from ``peftjax.shard``. Each process feeds only its own rows of the global batch
(``jax.make_array_from_process_local_data``) and places parameters with
``jax.make_array_from_callback`` (every process holds the same host copy).
Checkpoints go through ``peftjax.io.checkpoint``, which every process calls:
each writes the shards it holds.

On a TPU pod or a SLURM / multi-node GPU cluster ``jax.distributed.initialize()``
needs no arguments; elsewhere pass the coordinator::

    python examples/multihost/train.py --coordinator=host0:12345 \\
        --num_processes=2 --process_id=0      # on host 0
    python examples/multihost/train.py --coordinator=host0:12345 \\
        --num_processes=2 --process_id=1      # on host 1

``launch_local.sh`` runs two CPU processes with 4 devices each on one machine
(an 8-device global mesh) and then the same training in one process with 8
devices; both print the same final loss and parameter checksum.
"""

import argparse
import functools
import os
import sys


def _index(x, idx):
    return x[idx]


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coordinator", default=None, help="host:port of process 0")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    p.add_argument(
        "--cpu_devices",
        type=int,
        default=0,
        help="simulate this many CPU devices per process (demo)",
    )
    p.add_argument(
        "--single",
        action="store_true",
        help="no jax.distributed: one process (the comparison run)",
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ckpt", default="", help="checkpoint directory (shared)")
    return p.parse_args()


def main():
    args = _args()
    if args.cpu_devices:  # must precede JAX's start
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count="
            f"{args.cpu_devices}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if not args.single:
        if args.coordinator is None:
            jax.distributed.initialize()  # TPU pods, SLURM, ... auto-detect
        else:
            jax.distributed.initialize(
                coordinator_address=args.coordinator,
                num_processes=args.num_processes,
                process_id=args.process_id,
            )
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    sys.path.insert(
        0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    )
    from peftjax import adapters, shard, train, tree
    from peftjax import models as pm
    from peftjax.models import llama

    n_proc, n_local = jax.process_count(), jax.local_device_count()
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = shard.make_mesh(data=n_proc, fsdp=n_local, devices=devices)

    cfg = llama.tiny_config()
    gdef, params = pm.split_params(
        llama.LlamaForCausalLM(cfg, scan_layers=True, rngs=nnx.Rngs(0))
    )
    batch = 8
    tokens = np.random.default_rng(0).integers(0, 256, (batch, 65)).astype(np.int32)

    def loss_fn(p, toks):
        logits = pm.apply(gdef, p, toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, toks[:, 1:]
        ).mean()

    loss_fn = shard.constrain_scan_carries(loss_fn, mesh, batch_size=batch)
    a = tree.assign(
        params,
        [tree.Rule(where=r".*(q|k|v|o)_proj/kernel", then=adapters.lora(4, alpha=8.0))],
    )
    opt = optax.adamw(1e-2, eps=1e-4)
    trainer = train.trainer(loss_fn, opt, adapters=a)  # factored; the state is donated
    state = trainer.init(jax.random.key(0), params)

    p_sh = shard.param_shardings(mesh, params, shard.transformer_rules())
    s_sh = shard.adapter_shardings(
        mesh, a, params, p_sh, adapters.AdapterState(state.trainable, state.frozen)
    )
    o_sh = shard.state_shardings(mesh, state.opt_state, state.trainable, s_sh.trainable)
    b_sh = shard.batch_sharding(mesh)
    rep = shard.replicated(mesh)

    def put(tree_, shardings):
        # every process holds the same host copy; each places its own shards
        return jax.tree.map(
            lambda x, s: jax.make_array_from_callback(
                x.shape, s, functools.partial(_index, np.asarray(x))
            ),
            tree_,
            shardings,
        )

    key = jax.random.wrap_key_data(put(jax.random.key_data(state.key), rep))
    state = put(
        state._replace(key=None),
        train.TrainState(s_sh.trainable, s_sh.frozen, o_sh, rep, None),
    )._replace(key=key)
    params = put(params, p_sh)
    # this process's rows of the global batch (its devices hold them)
    rows = batch // n_proc
    local = tokens[jax.process_index() * rows : (jax.process_index() + 1) * rows]
    toks = jax.make_array_from_process_local_data(b_sh, local)

    for _ in range(args.steps):
        state, metrics = trainer.step(state, toks, params)
    trainable, opt_state, loss = state.trainable, state.opt_state, metrics["loss"]
    checksum = jax.jit(
        lambda t: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t)),
        out_shardings=shard.replicated(mesh),
    )(trainable)
    if args.ckpt:
        from peftjax.io import checkpoint

        checkpoint.save(
            args.ckpt, args.steps, {"trainable": trainable, "opt_state": opt_state}
        )
    if jax.process_index() == 0:
        print(
            f"processes={n_proc} devices={len(jax.devices())} "
            f"loss={float(loss):.6f} checksum={float(checksum):.6f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
