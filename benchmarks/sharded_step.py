# SPDX-License-Identifier: Apache-2.0
"""Per-device memory of sharded LoRA and GaLore steps on SmolLM2-135M (8 devices).

Question: with FSDP over 8 devices, does a GaLore step hold at most 0.2 x the
bytes per device of the same step on one device (parameters, gradients,
optimizer state and the activations of a fixed global batch all split eight
ways), and what does a GaLore refresh cost per device when its SVDs gather
whole matrices?

How: SmolLM2-135M-Instruct's configuration (read from the offline GGUF's
metadata; the weights are not needed), scanned layers, float32, global batch
8 x 128. Each step is compiled (never run) with shardings from
``peftjax.shard`` on ``(data, fsdp)`` meshes 1x1, 2x4, 8x1 and 1x8 of 8
simulated CPU devices (``transformer_rules()``: column/row-parallel kernels
and the vocabulary axis of the embedding on ``fsdp``; adapter and optimizer
state derived with ``adapter_shardings`` / ``state_shardings``; the loss wrapped in
``constrain_scan_carries`` so the scanned layers' activations stay split over
the batch), with parameters / adapter state and optimizer state donated.
Memory per device is
``argument + output + temp - alias`` from ``compiled.memory_analysis()`` (with
everything donated this is ``argument + temp``); XLA's SPMD programs report
one device's buffers.

* ``lora``: LoRA r=8, alpha 16 on q, k, v, o (factored path), AdamW.
* ``galore``: full-parameter training, GaLore (rank 128, ``std``, gap 200,
  scale 0.25, HF-style Adam inside) on the attention and MLP kernels, AdamW
  on the rest. ``per_device_bytes_galore_*`` is the real step, which holds
  the refresh under ``lax.cond`` (XLA reserves the larger branch), with
  ``refresh_sharding=shard.refresh_sharding(mesh)`` on every mesh (1x1
  included): each device refreshes its share of the 30 layers (padded to a
  multiple of the device count), one SVD call at a time. ``..._galore_norefresh_*`` is
  the same step whose projector never refreshes (no SVD anywhere), i.e. the
  steps between refreshes. At 1x1 and 1x8 the refresh placements are compared:
  ``batched`` (the default: one batched SVD of all layers, each device
  gathering every layer's gradient), ``per_layer`` (``refresh_batch_size=1``:
  one layer's gradient gathered at a time, every device running all 30
  SVDs) and ``spread`` (the headline).

Compile only, deterministic: safe to run on a shared machine, but it takes
minutes of CPU. ``--smoke`` uses a tiny Llama (GaLore rank 8) and meshes 1x1
and 1x8 only.

Usage::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/sharded_step.py --json=OUT
    .venv/bin/python benchmarks/sharded_step.py --help   # every option

(the script sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself
when it starts; it refuses to run if JAX was configured otherwise).
"""

import dataclasses
import os
import re
import sys
import time

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402  (benchmarks/_harness.py)

from peftjax import train  # noqa: E402

opt = train.option

ATTN = r"layers/self_attn/(q|k|v|o)_proj/kernel"
PROJECTED = r"layers/(self_attn|mlp)/\w+/kernel"
MESHES = ((1, 1), (2, 4), (8, 1), (1, 8))


@dataclasses.dataclass(frozen=True)
class Config:
    """Per-device memory of sharded LoRA and GaLore steps on SmolLM2-135M (8 devices)."""

    batch: int = opt(8, "Global batch (sequences per step), split over the data axis.")
    seq_len: int = opt(128, "Tokens per sequence (the ids hold one more for the targets).")
    lora_rank: int = opt(8, "LoRA rank on q, k, v, o (alpha = 2 * rank).")
    galore_rank: int = opt(128, "GaLore rank on the attention and MLP kernels.")
    smoke: bool = opt(False, "Tiny Llama, meshes 1x1 and 1x8 only.")
    json: str = opt("", "Write the result to this JSON file.")


SMOKE = {"galore_rank": 8}


def _model(cfg):
    import jax
    from flax import nnx

    from peftjax import io
    from peftjax import models as pm
    from peftjax.models import llama

    if cfg.smoke:
        mcfg = llama.tiny_config(num_hidden_layers=4)
    else:
        meta = io.read_gguf_metadata(pm.smollm2_gguf())
        mcfg = llama.config_from_gguf(meta, has_output=False)
    abstract = nnx.eval_shape(
        lambda: llama.LlamaForCausalLM(mcfg, scan_layers=True, rngs=nnx.Rngs(0))
    )
    gdef, params = pm.split_params(abstract)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return cfg, mcfg, gdef, params


def _bytes(compiled):
    m = compiled.memory_analysis()
    return _harness.step_bytes(compiled), {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "alias": m.alias_size_in_bytes,
    }


def _svd_shapes(compiled):
    """Operand shapes of the per-device SVD calls in the compiled program."""
    out = []
    for line in compiled.as_text().splitlines():
        if "gesdd" in line or "gesvd" in line:
            m = re.search(r"custom-call\((.*?)\)", line)
            head = line.split("=", 1)[1] if "=" in line else line
            shape = re.search(r"f32\[([\d,]+)\]", head)
            if m and shape:
                out.append(shape.group(1))
    return sorted(set(out))


def _loss(gdef, mesh, batch):
    import optax

    from peftjax import models as pm
    from peftjax import shard

    def loss_fn(p, toks):
        logits = pm.apply(gdef, p, toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, toks[:, 1:]
        ).mean()

    # the scanned layers' activations stay split over the batch (see
    # peftjax.shard.constrain_scan_carries)
    return shard.constrain_scan_carries(loss_fn, mesh, batch_size=batch)


def _lora(mesh, gdef, params, tokens, cfg):
    import jax
    import optax

    from peftjax import adapters, shard, train, tree

    a = tree.assign(
        params,
        [
            tree.Rule(
                where=ATTN, then=adapters.lora(cfg.lora_rank, alpha=2.0 * cfg.lora_rank)
            )
        ],
    )
    opt = optax.adamw(1e-4)
    # train.trainer's step (factored, the state donated), lowered on placed shapes
    t = train.trainer(_loss(gdef, mesh, cfg.batch), opt, adapters=a)
    st = jax.eval_shape(lambda p: t.init(jax.random.key(0), p), params)
    p_sh = shard.param_shardings(mesh, params, shard.transformer_rules())
    s_sh = shard.adapter_shardings(mesh, a, params, p_sh,
                                   adapters.AdapterState(st.trainable, st.frozen))
    o_sh = shard.state_shardings(mesh, st.opt_state, st.trainable, s_sh.trainable)
    rep = shard.replicated(mesh)

    def placed(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    state = jax.tree.map(placed, st, train.TrainState(s_sh.trainable, s_sh.frozen, o_sh,
                                                      rep, rep))
    return t.step.lower(state, placed(tokens, shard.batch_sharding(mesh)),
                        jax.tree.map(placed, params, p_sh)).compile()


def _galore(mesh, gdef, params, tokens, cfg, refresh):
    import jax
    import optax

    from peftjax import optim, shard, tree

    kw = {}
    projector = None
    if refresh == "spread":
        kw = dict(refresh_sharding=shard.refresh_sharding(mesh))
    elif refresh == "per_layer":
        kw = dict(refresh_batch_size=1)
    elif refresh == "none":
        svd = optim.svd()
        projector = optim.Projector(svd.init, lambda g, b, s, k: b, svd.down, svd.up)
    labels = tree.labels(
        params, [tree.Rule(where=PROJECTED, then="galore")], default="adamw"
    )
    opt = optax.partition(
        {
            "galore": optim.galore(
                1e-3,
                rank=cfg.galore_rank,
                update_proj_gap=200,
                scale=0.25,
                inner=optim.scale_by_adam_hf(eps=1e-6),
                projector=projector,
                **kw,
            ),
            "adamw": optax.adamw(1e-3),
        },
        labels,
    )
    o0 = jax.eval_shape(opt.init, params)
    p_sh = shard.param_shardings(mesh, params, shard.transformer_rules())
    o_sh = shard.state_shardings(mesh, o0, params, p_sh)
    loss_fn = _loss(gdef, mesh, cfg.batch)

    def step(p, o, toks):
        loss, g = jax.value_and_grad(loss_fn)(p, toks)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    jitted = jax.jit(
        step,
        in_shardings=(p_sh, o_sh, shard.batch_sharding(mesh)),
        out_shardings=(p_sh, o_sh, shard.replicated(mesh)),
        donate_argnums=(0, 1),
    )
    return jitted.lower(params, o0, tokens).compile()


def main(cfg: Config) -> dict:
    import jax
    import jax.numpy as jnp

    from peftjax import shard

    if len(jax.devices()) != 8:
        raise SystemExit(f"needs 8 devices ({_FLAG}), got {len(jax.devices())}")
    load_before = os.getloadavg()
    t0 = time.time()
    cfg, mcfg, gdef, params = _model(cfg)
    tokens = jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len + 1), jnp.int32)
    meshes = ((1, 1), (1, 8)) if cfg.smoke else MESHES
    out: dict = {
        "config": dataclasses.asdict(cfg),
        "model": {
            "layers": mcfg.num_hidden_layers,
            "hidden": mcfg.hidden_size,
            "intermediate": mcfg.intermediate_size,
            "vocab": mcfg.vocab_size,
        },
    }
    details: dict = {}

    def mesh_of(d, f):
        return shard.make_mesh(data=d, fsdp=f, devices=jax.devices()[: d * f])

    for d, f in meshes:
        name = f"{d}x{f}"
        mesh = mesh_of(d, f)
        runs = {"lora": None, "galore": "spread", "galore_norefresh": "none"}
        if (d, f) in ((1, 1), (1, 8)):
            runs["galore_batched"] = "batched"
        if (d, f) == (1, 8):
            runs["galore_per_layer"] = "per_layer"
        for method, refresh in runs.items():
            t = time.time()
            if refresh is None:
                compiled = _lora(mesh, gdef, params, tokens, cfg)
            else:
                compiled = _galore(mesh, gdef, params, tokens, cfg, refresh)
            total, parts = _bytes(compiled)
            out[f"per_device_bytes_{method}_{name}"] = total
            details[f"{method}_{name}"] = {
                **parts,
                "compile_s": round(time.time() - t, 1),
                "svd_operands": _svd_shapes(compiled),
            }
            print(
                f"{method:18s} {name}: {total / 2**20:9.1f} MiB per device "
                f"(temp {parts['temp'] / 2**20:.1f} MiB)",
                flush=True,
            )
            del compiled
    base = out["per_device_bytes_galore_1x1"]
    ratio = out["per_device_bytes_galore_1x8"] / base
    out["ratio_galore_1x8"] = ratio
    out["ratio_galore_norefresh_1x8"] = (
        out["per_device_bytes_galore_norefresh_1x8"]
        / out["per_device_bytes_galore_norefresh_1x1"]
    )
    out["ratio_lora_1x8"] = (
        out["per_device_bytes_lora_1x8"] / out["per_device_bytes_lora_1x1"]
    )
    out["target_galore_1x8_le_0.2"] = bool(ratio <= 0.2)
    L = mcfg.num_hidden_layers
    out["svd_per_device_per_leaf"] = {
        "batched": L,
        "per_layer": L,
        "spread": -(-L // 8),
    }
    out["details"] = details
    out["loadavg_before"] = load_before
    out["loadavg_after"] = os.getloadavg()
    out["seconds"] = round(time.time() - t0, 1)
    out["versions"] = _harness.machine()
    print(
        f"galore 1x8 / 1x1 = {ratio:.3f} (target <= 0.2: "
        f"{'met' if ratio <= 0.2 else 'missed'})"
    )
    _harness.write_json(cfg.json, dict(sorted(out.items())))
    return out


def _parse(argv: list[str]) -> Config:
    return train.parse_config(Config, argv, smoke=SMOKE)


if __name__ == "__main__":
    main(_parse(sys.argv[1:]))
