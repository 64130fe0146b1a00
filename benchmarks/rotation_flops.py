# SPDX-License-Identifier: Apache-2.0
"""Factored-path FLOPs of the rotation tuners against LoRA at the same trainable count.

One dense layer ``y = x @ W`` (``x (tokens, in)``, ``W (in, out)``), the
adapter applied by ``factored.transform``; the figure is XLA's
``cost_analysis()["flops"]`` of the compiled forward + gradient with respect
to the trainable arrays (deterministic: no timing). For each method the
rank of the comparison LoRA is the one whose ``r·(in+out)`` is closest to the
method's trainable count, and the ratio ``method / LoRA`` is reported for the
whole step and for the adapter's share (step minus the base layer's step
with a frozen, unadapted ``W``: the same forward and the ``x`` cotangent).

OFT, BOFT and HRA rotate ``x`` before the base product (``in_map``), RoAd
rotates the product's outputs (``out_map``), PSOFT, OSF and DeFT add
low-rank terms; none forms ``R·W``.

Usage: ``PYTHONPATH=. .venv/bin/python benchmarks/rotation_flops.py [--out
benchmarks/out/rotation_flops.json] [--tokens 512] [--dim 576]``
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

from peftjax import adapters, factored  # noqa: E402


def _methods(dim: int) -> dict:
    return {
        "oft(block_size=32)": adapters.oft(32),
        "oft(block_size=32, exact Cayley)": adapters.oft(32, use_cayley_neumann=False),
        "boft(block_size=8, 2 factors)": adapters.boft(8, n_butterfly_factor=2),
        "hra(r=16)": adapters.hra(16),
        "road(road_4)": adapters.road("road_4", group_size=64),
        "psoft(r=64)": adapters.psoft(64, alpha=64.0),
        "osf(preserve dim-8)": adapters.osf(dim - 8),
        "deft(r=8)": adapters.deft(8),
    }


def _step_flops(fn, *args) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def measure(dim: int, tokens: int) -> dict:
    key = jax.random.key(0)
    w = jax.random.normal(key, (dim, dim), jnp.float32) / dim ** 0.5
    x = jax.random.normal(jax.random.key(1), (tokens, dim), jnp.float32)
    params = {"w": w}

    def base_step(params, x):
        return jax.grad(lambda xx: jnp.sum(xx @ params["w"]) ** 2)(x)

    base = _step_flops(base_step, params, x)

    def adapted(adapter):
        assignment = {"w": adapter}
        state = adapters.init(assignment, key, params)

        def step(t, f, x):
            def loss(t, xx):
                y = factored.transform(lambda p, xx: xx @ p["w"], assignment, t, f)(
                    params, xx)
                return jnp.sum(y) ** 2
            return jax.grad(loss, argnums=(0, 1))(t, x)

        n = sum(int(a.size) for a in jax.tree.leaves(state.trainable))
        return n, _step_flops(step, state.trainable, state.frozen, x)

    rows = []
    for name, adapter in _methods(dim).items():
        n, flops = adapted(adapter)
        r = max(1, round(n / (2 * dim)))
        n_lora, flops_lora = adapted(adapters.lora(r))
        rows.append({
            "method": name, "trainable": n, "step_flops": flops,
            "lora_rank": r, "lora_trainable": n_lora, "lora_step_flops": flops_lora,
            "step_ratio": flops / flops_lora,
            "adapter_share_ratio": (flops - base) / max(flops_lora - base, 1.0),
        })
    return {"dim": dim, "tokens": tokens, "base_step_flops": base, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(_harness.HERE, "out",
                                                  "rotation_flops.json"))
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    res = measure(args.dim, args.tokens)
    res["machine"] = _harness.machine()
    print(f"one {args.dim}x{args.dim} layer, {args.tokens} tokens, forward + gradient "
          f"(base layer alone: {res['base_step_flops']:.3g} flops)")
    print("| method | trainable | step FLOPs | LoRA rank (trainable) | LoRA step FLOPs "
          "| step ratio | adapter-share ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {r['method']} | {r['trainable']:,} | {r['step_flops']:.3g} | "
              f"{r['lora_rank']} ({r['lora_trainable']:,}) | {r['lora_step_flops']:.3g} | "
              f"{r['step_ratio']:.2f} | {r['adapter_share_ratio']:.2f} |")
    _harness.write_json(args.out, res)


if __name__ == "__main__":
    main()
