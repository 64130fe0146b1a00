# SPDX-License-Identifier: Apache-2.0
"""The fine-tuning methods the experiments compare (public API only).

``METHODS``: method name -> a builder ``(cfg, params, optim, key, *,
init_data=None) -> Setup``. A ``Setup`` holds real Python objects: the
arguments of ``peftjax.train.trainer`` (an adapter assignment, rules of
leaves trained in full, a SpIEL selector), the method's optimizer transform,
and, for data-driven initialisers (PiSSA, LoRA-SB), the adapter state they
computed. ``_recipe.start`` turns it into a trainer and a training state.

Re-exported by ``_recipe``; experiments import ``_recipe`` alone.
"""

import os
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import optax

from peftjax import adapters, inits, masks, optim, tree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _methods_inputs import INPUT_METHODS  # noqa: E402
from _setup import InitData, OptimConfig, Setup, adamw  # noqa: E402,F401

ATTN = r"(.*/)?self_attn/(q_proj|k_proj|v_proj|o_proj)/kernel"
LINEAR = r"(.*/)?(self_attn|mlp)/\w+_proj/kernel"
NORMS = r"(.*/)?\w*norm/(scale|bias)"  # LN tuning: every norm's parameters
EMBED = r"(.*/)?embed_tokens/embedding"  # trainable tokens: the input table


def _targets(cfg: Any) -> str:
    return getattr(cfg, "targets", ATTN) or ATTN


def data_driven(plan: dict, key: jax.Array, params: Any, stats: dict | None = None
                ) -> tuple[dict, Any, adapters.AdapterState]:
    """``inits.run`` one target per jitted program; ``(assignment, base, state)``.

    One program for every target would run several batched SVDs at once;
    jaxlib's CPU LAPACK kernels split each batched call into chunks on a
    2-thread pool and block a thread per call, so two at once can deadlock a
    2-core machine (it hung PiSSA on SmolLM2). Per-leaf keys are folded from
    each path, so the result equals one joint init.
    """
    assignment, residual, trainable, frozen = {}, {}, {}, {}
    for path in plan:
        sub = {path: plan[path]}

        def run(k, p, g, sub=sub, path=path):
            res = inits.run(sub, k, p, stats=g)
            assignment.update(res.assignment)  # static adapters, known at trace
            return tree.leaves_by_path(res.params)[path], res.state

        g = None if stats is None else {path: stats[path]}
        leaf, st = jax.block_until_ready(jax.jit(run)(key, params, g))
        residual[path] = leaf
        trainable.update(st.trainable)
        frozen.update(st.frozen)
    base = tree.map_with_path(lambda p, x: residual.get(p, x), params)
    return assignment, base, adapters.AdapterState(trainable, frozen)


def _adapter_method(make_adapter: Callable[[Any], adapters.Adapter], *, peft: bool = True,
                    where: str | None = None):
    def build(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
              init_data: InitData | None = None) -> Setup:
        del key, init_data  # the trainer initialises the adapters
        assignment = tree.assign(params, [tree.Rule(where=where or _targets(cfg),
                                                    then=make_adapter(cfg))])

        def peft_export(state):
            return assignment, adapters.AdapterState(state.trainable, state.frozen)

        return Setup(params, adamw(run), tree.describe(assignment, params),
                     adapters=assignment, peft=peft_export if peft else None)

    return build


def _osf(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
         init_data: InitData | None = None) -> Setup:
    """OSF at LoRA's rank: each targeted matrix preserves min(in, out) - rank
    singular directions, so r·(in+out+1) trainable (LoRA's count + r);
    PEFT's default (half of min(in, out)) would train about the whole matrix."""
    del key, init_data
    probe = tree.assign(params, [tree.Rule(where=_targets(cfg), then=adapters.lora(1))])
    leaves = tree.leaves_by_path(params)
    rules = []
    for p, a in sorted(probe.items()):
        d = tree.resolve(a.dimension_numbers, tuple(leaves[p].shape), path=p)
        k = max(min(d.n_in, d.n_out) - cfg.rank, 1)
        rules.append(tree.Rule(where=re.escape(p), then=adapters.osf(k)))
    assignment = tree.assign(params, rules)

    def peft_export(state):
        return assignment, adapters.AdapterState(state.trainable, state.frozen)

    return Setup(params, adamw(run), tree.describe(assignment, params),
                 adapters=assignment, peft=peft_export)


def _frod(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
          init_data: InitData | None = None) -> Setup:
    """FRoD: one shared basis per module role (``group``), as PEFT's categories;
    on the scanned models a role is one stacked leaf. Sparse rate 0.025:
    ``in + 0.025·in²`` per matrix, about LoRA r=8's ``8·(in+out)`` on 576x576.
    No PEFT export: PEFT regenerates its own bases when loading."""
    del key, init_data
    probe = tree.assign(params, [tree.Rule(where=_targets(cfg), then=adapters.lora(1))])
    assignment = tree.assign(params, [
        tree.Rule(where=re.escape(p), then=adapters.frod(0.025, group=p)) for p in probe])
    return Setup(params, adamw(run), tree.describe(assignment, params),
                 adapters=assignment, peft=None)


def _sized_method(make_adapter: Callable[[Any, int, int], adapters.Adapter]):
    """``_adapter_method`` for adapters whose shared frozen arrays are sized by the
    largest targeted input and output widths (RandLoRA, PVeRA), as PEFT sizes them."""
    def build(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
              init_data: InitData | None = None) -> Setup:
        probe = tree.assign(params, [tree.Rule(where=_targets(cfg), then=adapters.lora(1))])
        leaves = tree.leaves_by_path(params)
        dims = [tree.resolve(a.dimension_numbers, tuple(leaves[p].shape), path=p)
                for p, a in probe.items()]
        widths = max(d.n_in for d in dims), max(d.n_out for d in dims)
        return _adapter_method(lambda c: make_adapter(c, *widths))(
            cfg, params, run, key, init_data=init_data)

    return build


def _full(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
          init_data: InitData | None = None) -> Setup:
    return Setup(params, adamw(run), "full fine-tuning: every parameter is trained")


def _projected(name: str, transform: Callable[..., optax.GradientTransformation]):
    """GaLore / FRUGAL on the attention and MLP kernels, AdamW elsewhere."""

    def build(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
              init_data: InitData | None = None) -> Setup:
        labels = tree.labels(params, [tree.Rule(where=LINEAR, then=name)], default="adamw")
        inner, what = transform(cfg, run)
        tx = optax.partition({name: inner, "adamw": adamw(run)}, labels)
        return Setup(params, tx, f"{what} on attention/MLP kernels, AdamW elsewhere")

    return build


def _galore_tx(cfg: Any, run: OptimConfig):
    rank = int(getattr(cfg, "galore_rank", 0) or cfg.rank)
    return optim.galore(run.learning_rate(), rank=rank,
                        update_proj_gap=int(getattr(cfg, "update_proj_gap", 200)),
                        scale=float(getattr(cfg, "galore_scale", 0.25)),
                        weight_decay=run.weight_decay), f"GaLore rank {rank}"


def _frugal_tx(cfg: Any, run: OptimConfig):
    density = float(getattr(cfg, "frugal_density", 0.25))
    return optim.frugal(run.learning_rate(), density=density,
                        update_gap=int(getattr(cfg, "update_proj_gap", 200)),
                        weight_decay=run.weight_decay), f"FRUGAL density {density}"


def _lisa(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
          init_data: InitData | None = None) -> Setup:
    n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    tx = optim.lisa(run.learning_rate(), n_layers=n_layers,
                    n_active=int(getattr(cfg, "lisa_active", 2)),
                    interval=int(getattr(cfg, "lisa_interval", 20)),
                    weight_decay=run.weight_decay, layers=None, stacked=r"layers/.*", key=0)
    return Setup(params, tx, "LISA: embeddings, head and norms always, 2 sampled "
                 "layers at a time")


def _loraplus(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
              init_data: InitData | None = None) -> Setup:
    setup = METHODS["lora"](cfg, params, run, key)
    return setup._replace(optimizer=optim.loraplus(
        run.learning_rate(), ratio=float(getattr(cfg, "loraplus_ratio", 16.0)),
        weight_decay=run.weight_decay))


def _lorafa(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
            init_data: InitData | None = None) -> Setup:
    """LoRA-FA: LoRA's A frozen at its init, B's gradient projected (PEFT's optimizer)."""
    setup = METHODS["lora"](cfg, params, run, key)
    scaling = adapters.scaling_value(adapters.Scaling.ALPHA_OVER_RANK, cfg.alpha, cfg.rank)
    return setup._replace(optimizer=optim.lorafa(
        run.learning_rate(), scaling=scaling, weight_decay=run.weight_decay))


def _riemannian(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
                init_data: InitData | None = None) -> Setup:
    """Riemannian-preconditioned LoRA: r×r Gram preconditioners before AdamW."""
    setup = METHODS["lora"](cfg, params, run, key)
    return setup._replace(optimizer=optim.riemannian(
        run.learning_rate(), reg=float(getattr(cfg, "riemannian_reg", 1e-2)),
        weight_decay=run.weight_decay))


def _lamda(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
           init_data: InitData | None = None) -> Setup:
    """LaMDA at LoRA's rank and alpha, its second projection gradually frozen after AdamW."""
    setup = _adapter_method(lambda c: adapters.lamda(c.rank, alpha=c.alpha),
                            peft=False)(cfg, params, run, key)
    return setup._replace(optimizer=optax.chain(
        setup.optimizer, adapters.lamda_freeze(run.total_steps)))


def _cola(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
          init_data: InitData | None = None) -> Setup:
    """COLA: LoRA trained as a chain of 3 equal links (merge, re-initialise, reset)."""
    if run.accum_steps != 1:
        raise ValueError("--method=cola runs train.cola, which takes one batch per step "
                         f"(accum_steps=1), got accum_steps={run.accum_steps}")
    return METHODS["lora"](cfg, params, run, key)._replace(cycles=3, peft=None)


def _roselora(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
              init_data: InitData | None = None) -> Setup:
    """RoseLoRA: LoRA whose A rows / B columns are thresholded to density 0.5
    after each update (sensitivity EMA, cubic schedule after a 10% warm-up)."""
    del key, init_data
    assignment = tree.assign(params, [tree.Rule(
        where=_targets(cfg), then=adapters.roselora(cfg.rank, alpha=cfg.alpha))])
    tx = adapters.roselora_sparsify(
        adamw(run), density=0.5, total_steps=run.total_steps,
        warmup_steps=max(run.total_steps // 10, 1), final_steps=run.total_steps // 5)
    return Setup(params, tx, tree.describe(assignment, params), adapters=assignment)


def _clover(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
            init_data: InitData | None = None) -> Setup:
    """CLOVER: per-head d×d singular-value matrices on q, k, v (RoPE and GQA leave
    ``clover_orthogonalize`` a no-op: the adapter orthogonalises each head)."""
    if init_data is None or init_data.config is None:
        raise ValueError("--method=clover needs the model's config (init_data=InitData"
                         "(..., config=lm.config)): its blocks are the attention heads")
    build = _adapter_method(lambda c: adapters.clover(init_data.config.head_dim), peft=False,
                            where=r"(.*/)?self_attn/(q_proj|k_proj|v_proj)/kernel")
    return build(cfg, params, run, key)


def _init_method(make: Any, label: str) -> Any:
    """A data-driven init without statistics; PEFT export: plain LoRA (to_lora)."""
    def build(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
              init_data: InitData | None = None) -> Setup:
        plan = tree.assign(params, [tree.Rule(where=_targets(cfg), then=make(cfg))])
        assignment, base, state = data_driven(plan, key, params)

        def peft_export(trained):
            return inits.to_lora(plan, state.trainable, trained.trainable, state.frozen)

        return Setup(base, adamw(run), label + "\n" + tree.describe(assignment, params),
                     adapters=assignment, initial=state, peft=peft_export)
    return build


def _pissa(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
           init_data: InitData | None = None) -> Setup:
    """PiSSA: the adapter starts at the top-r SVD of W and trains over the residual."""
    plan = tree.assign(params, [tree.Rule(where=_targets(cfg),
                                          then=inits.pissa(cfg.rank, alpha=cfg.alpha))])
    assignment, base, state = data_driven(plan, key, params)

    def peft_export(trained):  # a rank-2r LoRA over the unmodified base
        return inits.to_lora(plan, state.trainable, trained.trainable)

    return Setup(base, adamw(run), "PiSSA (residual base)\n"
                 + tree.describe(assignment, params), adapters=assignment, initial=state,
                 peft=peft_export)


def _lora_sb(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
             init_data: InitData | None = None) -> Setup:
    """LoRA-SB: a trainable ``r x r`` core between frozen bases set from the
    top-r SVD of an approximate first update (summed full-weight gradients
    over ``init_data.batches``); the base is not modified."""
    if init_data is None or not init_data.batches:
        raise ValueError(
            "--method=lora-sb initialises from accumulated full-weight gradients: "
            "build it with init_data=InitData(loss_fn, batches) holding at least one "
            "batch (demo.py and compare_methods.py pass --stat_batches training batches)")
    payload = inits.lora_sb(cfg.rank, learning_rate=run.lr,
                            warmup_ratio=run.warmup_steps / run.total_steps,
                            total_steps=run.total_steps)
    plan = tree.assign(params, [tree.Rule(where=_targets(cfg), then=payload)])
    stats = inits.accumulate_gradients(init_data.loss_fn, params, init_data.batches,
                                       list(plan), mean=False)
    assignment, _, state = data_driven(plan, key, params, stats)
    return Setup(params, adamw(run),
                 f"LoRA-SB (r x r core, {len(init_data.batches)} gradient batches)\n"
                 + tree.describe(assignment, params), adapters=assignment, initial=state)


def _sparse(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
            init_data: InitData | None = None) -> Setup:
    """SpIEL sparse fine-tuning at LoRA's budget: ``k = r·(in + out)`` entries
    per targeted kernel (per layer of a stack), dropped and regrown on the
    SpIEL-AG schedule inside the training step (the supports are the
    state's ``frozen`` part; only the values are trained and counted)."""
    flat = tree.leaves_by_path(params)
    lora_plan = tree.assign(params, [tree.Rule(where=_targets(cfg),
                                               then=adapters.lora(cfg.rank))])
    assignment = tree.assign(params, [
        tree.Rule(where=re.escape(p), then=adapters.sparse_delta(
            k=cfg.rank * (flat[p].shape[-2] + flat[p].shape[-1]))) for p in lora_plan])
    reselect = int(getattr(cfg, "spiel_reselection_steps", 20))
    accumulate = int(getattr(cfg, "spiel_accumulation_steps", 5))
    selector = masks.spiel_selector(total_steps=run.total_steps,
                                    reselection_steps=reselect,
                                    accumulation_steps=accumulate)
    return Setup(params, optim.sft_adamw(run.learning_rate(),
                                         weight_decay=run.weight_decay),
                 f"SpIEL sparse deltas, k = {cfg.rank}·(in + out) per kernel (LoRA's "
                 f"budget), reselection every {reselect} steps after {accumulate} steps "
                 "of gradient accumulation\n" + tree.describe(assignment, params),
                 adapters=assignment, sparse=selector)


def _trainable_tokens(cfg: Any, params: Any, run: OptimConfig, key: jax.Array, *,
                      init_data: InitData | None = None) -> Setup:
    """Trainable tokens on the input table: its ``64·r`` lowest token ids, at
    most half the vocabulary (in a byte-level BPE vocabulary the bytes and the
    first merges, the most frequent pieces); a tied head shares the table, so
    it sees the same rows."""
    flat = tree.leaves_by_path(params)
    table = [p for p in flat if re.fullmatch(EMBED, p)]
    if len(table) != 1:
        raise ValueError(f"--method=trainable_tokens needs one input table {EMBED!r}; "
                         f"found {table}")
    n = min(64 * cfg.rank, flat[table[0]].shape[0] // 2)
    build = _adapter_method(lambda c: adapters.trainable_tokens(range(n)), where=EMBED)
    return build(cfg, params, run, key, init_data=init_data)


def unavailable(name: str, issue: int, what: str) -> Callable[..., Setup]:
    """A method builder that raises: ``name`` is not built yet (``issue``)."""

    def build(*_: Any, **__: Any) -> Setup:
        raise NotImplementedError(
            f"--method={name}: {what} is not available here yet (tracked in issue "
            f"{issue}). Available now: " + ", ".join(available_methods()))

    build.unavailable = True  # type: ignore[attr-defined]
    return build


METHODS: dict[str, Callable[..., Setup]] = {
    "lora": _adapter_method(lambda c: adapters.lora(c.rank, alpha=c.alpha)),
    "dora": _adapter_method(lambda c: adapters.dora(c.rank, alpha=c.alpha)),
    "loha": _adapter_method(lambda c: adapters.loha(c.rank, alpha=c.alpha)),
    "lokr": _adapter_method(lambda c: adapters.lokr(c.rank, alpha=c.alpha)),
    # n = 16·r spectral coefficients per matrix (PEFT's default 1000 needs
    # in·out >= 1000); PEFT's scaling 150 and N(0, 1) init
    "fourierft": _adapter_method(lambda c: adapters.fourierft(16 * c.rank)),
    # PEFT's default grid k = 2 and its alpha/r ratio; r·(in+out) as LoRA
    "gralora": _adapter_method(lambda c: adapters.gralora(c.rank, alpha=2.0 * c.rank)),
    # MiSS balance with r' = 2r: 2r·out per matrix, LoRA's count on square matrices
    "miss": _adapter_method(lambda c: adapters.miss(2 * c.rank)),
    # block 8·r (64 at r=8 divides SmolLM2's 576 and 192): in·out/(8r) per matrix
    "c3a": _adapter_method(lambda c: adapters.c3a(8 * c.rank)),
    # n = 16·r wavelet coefficients as FourierFT; PEFT's scaling 25, zero init, db1
    "waveft": _adapter_method(lambda c: adapters.waveft(16 * c.rank)),
    # RandLoRA: PEFT's r = 32 and alpha/r = 20 at rank 8 (bases of rank 4r);
    # ceil(min/4r)·(4r + min) per matrix, about LoRA's count on square matrices
    "randlora": _sized_method(lambda c, i, o: adapters.randlora(
        4 * c.rank, max_in=i, max_out=o, alpha=80.0 * c.rank)),
    # PVeRA: PEFT's r = 256 at rank 8 (32r), 2r + out per matrix; trained at its
    # mean (PEFT samples z in training), PEFT's d_initial 0.1
    "pvera": _sized_method(lambda c, i, o: adapters.pvera(32 * c.rank, max_in=i,
                                                           max_out=o)),
    # TinyLoRA: PEFT's SVD rank 2, u = 8·r coefficients per matrix (PEFT's 64 at r=8)
    "tinylora": _adapter_method(lambda c: adapters.tinylora(2, 8 * c.rank)),
    # SHiRA: r·(in+out) entries of PEFT's random mask, LoRA's count
    "shira": _adapter_method(lambda c: adapters.shira(c.rank)),
    # Super-Tuning: PEFT's default sparsity 0.99 (1% of each matrix, largest |W|)
    "supertuning": _adapter_method(lambda c: adapters.supertuning(0.99)),
    # VB-LoRA: sub-vectors of length 32 (divides SmolLM2's 576/192/1536 and the tiny
    # model's widths) from one shared bank of 64: 2r·(in+out) logits + 64·32 bank
    "vblora": _adapter_method(lambda c: adapters.vblora(c.rank, num_vectors=64,
                                                        vector_length=32)),
    # UniLoRA: one shared vector of 256·r entries for every adapted matrix
    "unilora": _adapter_method(lambda c: adapters.unilora(c.rank,
                                                          theta_d_length=256 * c.rank)),
    "ln_tuning": _adapter_method(lambda c: adapters.ln_tuning(), where=NORMS),
    # HiRA without its r-matmul factored form (r base products cost more than
    # one weight-sized W' here): the factored path materialises it, with a warning
    "hira": _adapter_method(lambda c: adapters.hira(c.rank)),
    "delora": _adapter_method(lambda c: adapters.delora(c.rank)),  # PEFT's lambda 15
    # PEANUT: PEFT's depth 0 (H = relu(W0@a)), 2r·out trainable per matrix
    "peanut": _adapter_method(lambda c: adapters.peanut(c.rank)),
    # HRA: 2r reflections (even: PEFT's paired identity init), 2r·in trainable,
    # LoRA's r·(in+out) on square matrices
    "hra": _adapter_method(lambda c: adapters.hra(2 * c.rank)),
    # BOFT: two butterfly factors of blocks of r: 2r·in + out trainable, LoRA's
    # r·(in+out) plus out on square matrices (in must be a multiple of 2r)
    "boft": _adapter_method(lambda c: adapters.boft(c.rank, n_butterfly_factor=2)),
    # PSOFT: strict Cayley rotation (both scales) in the rank-2r principal subspace,
    # (2r)(2r-1)/2 + 4r trainable per matrix; alpha = rank (the scaling cancels)
    "psoft": _adapter_method(lambda c: adapters.psoft(2 * c.rank, alpha=float(2 * c.rank))),
    # DeFT: relu projector, identity init; r·(in+out) trainable, LoRA's count
    "deft": _adapter_method(lambda c: adapters.deft(c.rank, alpha=int(c.alpha))),
    # GLoRA: PEFT's lora A/B at rank r/2 = LoRA's r·(in+out); SmolLM2's projections
    # have no bias, so C/D/E are none (PEFT's empty paths there)
    "glora": _adapter_method(lambda c: adapters.glora(max(1, c.rank // 2),
                                                      config_C="none",
                                                      config_D_E="none")),
    "frod": _frod,
    # OFT: blocks of 4r (divide SmolLM2's 576/192/1536 and the tiny model's
    # widths for r = 4, 8): in·(4r-1)/2 trainable, about LoRA's r·(in+out)
    # on square matrices
    "oft": _adapter_method(lambda c: adapters.oft(4 * c.rank)),
    # RoAd: PEFT's default road_1 (out trainable per matrix, rank-free), groups
    # of 32 (PEFT's 64 does not divide the tiny model's 32-wide k/v)
    "road": _adapter_method(lambda c: adapters.road(group_size=32)),
    "osf": _osf,
    # AdaMSS: SVD rank 4r, PEFT's 5 k-means groups of the outputs at rank 1:
    # 5·4r + out trainable per matrix (about LoRA's rank-1 count); the
    # projection on 4r singular vectors costs like a rank-2r LoRA per token
    "adamss": _adapter_method(lambda c: adapters.adamss(4 * c.rank, num_subspaces=5)),

    # QA-LoRA: LoRA on 16-feature group means (16 divides SmolLM2's 576/192/1536
    # and the tiny model's widths): r·(in/16 + out) trainable
    "qalora": _adapter_method(lambda c: adapters.qalora(c.rank, group_size=16,
                                                        alpha=c.alpha)),
    # BD-LoRA: block-diagonal B in 2 blocks on every target (all output widths are
    # even; BD-LoRA's serving layout would use "a" on o_proj/down_proj):
    # r·(in + out/2) trainable
    "bdlora": _adapter_method(lambda c: adapters.bdlora(c.rank, nblocks=2,
                                                        block_diagonal="b",
                                                        alpha=c.alpha)),
    "trainable_tokens": _trainable_tokens,
    # PEFT has no LoRA-XS format
    "lora_xs": _adapter_method(lambda c: adapters.lora_xs(c.rank, alpha=c.alpha),
                               peft=False),
    "full": _full,
    "galore": _projected("galore", _galore_tx),
    "frugal": _projected("frugal", _frugal_tx),
    "lisa": _lisa,
    "loraplus": _loraplus,
    "lorafa": _lorafa,  # LoRA-FA (optim.lorafa): A frozen, B's gradient projected
    "riemannian": _riemannian,  # Riemannian-preconditioned LoRA (optim.riemannian)
    "lora-sb": _lora_sb,  # needs init_data (gradient statistics)
    "pissa": _pissa,
    # orthogonal LoRA init (PEFT's): a@b = 0, both factors train; LoRA's count
    "orthogonal": _init_method(lambda c: inits.orthogonal(c.rank, alpha=c.alpha),
                               "orthogonal LoRA init"),
    # MiCA: b frozen on W's r minor singular directions, a trains: r·in per matrix
    "mica": _init_method(lambda c: inits.mica(c.rank, alpha=c.alpha), "MiCA (frozen b)"),
    "sparse": _sparse,  # SpIEL: drop-and-regrow inside the step
    # Tier 2, part 1 (no PEFT format unless said)
    # SVFT plain: the diagonal of M on W's own singular vectors + the authors' gate
    "svft": _adapter_method(lambda c: adapters.svft(), peft=False),
    # LoLDU: the full-width LDU diagonal, min(in, out) per matrix, scaling 1/r
    "loldu": _adapter_method(lambda c: adapters.loldu(), peft=False),
    # VectorFit: all singular values (Llama has no biases), min(in, out) per matrix
    "vectorfit": _adapter_method(lambda c: adapters.vectorfit(), peft=False),
    # KaSA (PEFT's kasa_config LoRA variant): r·(in+out) + r per matrix
    "kasa": _adapter_method(lambda c: adapters.kasa(c.rank)),
    # SALT: top 10% singular values scaled/shifted + a rank-r update of the rest
    "salt": _adapter_method(lambda c: adapters.salt(0.1, lora_rank=c.rank), peft=False),
    "clover": _clover,
    # MoRA type 6 (RoPE blocks): one r̂×r̂ square per matrix at LoRA's count
    "mora": _adapter_method(lambda c: adapters.mora(c.rank, mora_type=6), peft=False),
    "lamda": _lamda,  # r² + r·out trainable, the second projection frozen row by row
    # FLoRA on (in, out) kernels: Tucker core r×r and both factors, scale 2
    "flora": _adapter_method(lambda c: adapters.flora(c.rank, scale=2.0), peft=False),
    # DyLoRA at r_max = rank; the trainer draws no per-step rank (b = r_max here;
    # adapters.dylora_set_rank between steps samples b)
    "dylora": _adapter_method(lambda c: adapters.dylora(c.rank, alpha=c.alpha),
                              peft=False),
    # IncreLoRA: 2·rank slots; without increlora_grow it trains at its initial rank
    "increlora": _adapter_method(lambda c: adapters.increlora(2 * c.rank, alpha=c.alpha),
                                 peft=False),
    # B-only LoRA: frozen random orthogonal A, r·out trainable
    "lora_b_only": _adapter_method(lambda c: adapters.lora_b_only(c.rank, alpha=c.alpha),
                                   peft=False),
    # L4Q: 4-bit QAT of W0 + s·A@B, LSQ steps per 64 input rows; the factored
    # path materialises Q(W0 + s·A@B) (the quantised matrix is the weight)
    "l4q": _adapter_method(lambda c: adapters.l4q(c.rank, bits=4, block_size=64,
                                                  alpha=c.alpha), peft=False),
    "cola": _cola,  # LoRA as a chain of 3 links (train.cola): LoRA's count per link
    # SLTrain (fine-tuning form): LoRA plus 3% random sparse entries
    "sltrain": _adapter_method(lambda c: adapters.sltrain(c.rank, alpha=c.alpha),
                               peft=False),
    # DSEE: LoRA plus 128 sparse entries where W0 is worst explained by its rank-r SVD
    "dsee": _adapter_method(lambda c: adapters.dsee(c.rank, alpha=c.alpha), peft=False),
    "roselora": _roselora,  # LoRA, A rows / B columns thresholded to density 0.5
    # SPP: 16 input-scale rows and one scale per output (keeps a pruned base's mask)
    "spp": _adapter_method(lambda c: adapters.spp(), peft=False),
    # random-subspace intrinsic dimension: one shared θ_d of 64·r, sparse projections
    "intrinsic_dim": _adapter_method(lambda c: adapters.intrinsic_dim(
        64 * c.rank, projection="sparse"), peft=False),
    # SAID: one shared θ_d of 256·r (+ one λ per matrix), a Fastfood projection each
    "said": _adapter_method(lambda c: adapters.said(256 * c.rank), peft=False),
    # MoS: active rank r, LoRA's count at rank r/4 (shard pools shared per shape)
    "mos": _adapter_method(lambda c: adapters.mos(c.rank, pool_rank=max(2, c.rank // 4),
                                                  private_rank=1), peft=False),
    # prompts, prefixes and hooks (_methods_inputs): Setup.model calls the model
    **INPUT_METHODS,
}


def available_methods() -> list[str]:
    """Names in ``METHODS`` that are built."""
    return [n for n, b in METHODS.items() if not getattr(b, "unavailable", False)]


def method(name: str) -> Callable[..., Setup]:
    """Looks a method up; unknown names raise with the known ones."""
    if name not in METHODS:
        raise ValueError(f"--method={name!r} is unknown; choose one of {sorted(METHODS)}")
    return METHODS[name]
