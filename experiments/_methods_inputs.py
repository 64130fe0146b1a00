# SPDX-License-Identifier: Apache-2.0
"""The methods that feed the model inputs instead of changing its weights
(public API only): soft prompts, prefixes and model hooks.

Each builder returns a ``Setup`` whose ``params`` are ``{"model": the base,
<name>: the method's parameters}``; the method's trainable leaves are
``full`` leaves of a hybrid trainer (``adapters={}``), and ``Setup.model``
says how the model is called on that tree: ``models.apply(graphdef,
params["model"], tokens, prompt_embeddings=... | prefix=... | hooks=...)``.
``train.trainer`` itself is unchanged: it differentiates the method's
leaves, and its ``params`` (evaluation, export) return the tree with them
trained.

These models take no packed blocks: a prompt or prefix cannot be combined
with ``positions``/``segment_ids`` (``compare_methods --pack`` refuses these
methods); one document per block, the attention mask alone is exact.

Routing noise and sampling need a key in the loss, which ``train.trainer``
does not pass: Poly trains with PEFT's evaluation routing (the sigmoid), and
MonteCLoRA is not here (its draw needs a per-step key).

Exports: ``INPUT_METHODS``.
"""

import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, tree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _setup import InitData, OptimConfig, Setup, adamw  # noqa: E402

ATTN_SITES = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj")


def _config(name: str, init_data: InitData | None) -> Any:
    if init_data is None or init_data.config is None:
        raise ValueError(f"--method={name} needs the model's config (init_data=InitData"
                         "(..., config=lm.config)): its prompt, prefix or hook is sized "
                         "by the model")
    return init_data.config


def _setup(name: str, params: Any, own: Any, run: OptimConfig, describe: str,
           inputs: Callable[..., dict] | None = None, *,
           forward: Callable[..., jax.Array] | None = None, train: str = ".*") -> Setup:
    """The ``Setup`` of a method that feeds the model its own parameters.

    Exactly one of ``inputs(own, tokens, graphdef, base, mask) -> kwargs`` (the
    model's ``prompt_embeddings=``/``prefix=``/``hooks=``) or ``forward(own,
    tokens, graphdef, base, mask) -> logits`` (a method that runs the model
    itself: X-LoRA's two passes, DePT's embeddings). ``train``: the regex
    (under ``<name>/``) of the method's trained leaves.
    """
    if (inputs is None) == (forward is None):
        raise TypeError(f"_setup({name!r}): give exactly one of inputs= and forward=")

    def model(graphdef: Any) -> Callable[..., jax.Array]:
        from peftjax import models

        def apply(p: Any, tokens: jax.Array, *, attention_mask: Any = None,
                  positions: Any = None, segment_ids: Any = None) -> jax.Array:
            del positions, segment_ids  # one document per block: the mask's defaults
            args = (p[name], tokens, graphdef, p["model"], attention_mask)
            if forward is not None:
                return forward(*args)
            return models.apply(graphdef, p["model"], tokens, attention_mask=attention_mask,
                                **inputs(*args))

        return apply

    full = [tree.Rule(where=f"{name}/{train}", then=True)]
    return Setup({"model": params, name: own}, adamw(run), describe, adapters={},
                 full=full, model=model)


def _count(t: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(t)))


def _prompt_tuning(cfg, params, run, key, *, init_data=None):
    """Prompt tuning: ``2·rank`` soft-prompt rows sampled from the vocabulary."""
    table = params["embed_tokens"]["embedding"]
    own = adapters.prompt_tuning(key, 2 * cfg.rank, table,
                                 init=adapters.PromptInit.SAMPLE_VOCAB)
    return _setup("prompt_tuning", params, own, run,
                  f"soft prompt {own.embeddings.shape}: {_count(own):,} trainable",
                  lambda p, *_: {"prompt_embeddings": p.embeddings})


def _prefix_tuning(cfg, params, run, key, *, init_data=None):
    """Prefix tuning (P-tuning v2's direct form): ``rank`` keys/values per layer."""
    c = _config("prefix_tuning", init_data)
    own = adapters.prefix_tuning(key, cfg.rank, num_layers=c.num_hidden_layers,
                                 num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim)
    return _setup("prefix_tuning", params, own, run,
                  f"KV prefix {own.keys.shape} x2: {_count(own):,} trainable",
                  lambda p, *_: {"prefix": p})


def _p_tuning(cfg, params, run, key, *, init_data=None):
    """P-tuning: ``2·rank`` virtual tokens through PEFT's MLP prompt encoder."""
    d = params["embed_tokens"]["embedding"].shape[1]
    own = adapters.p_tuning(key, 2 * cfg.rank, d, d)
    return _setup("p_tuning", params, own, run,
                  f"P-tuning MLP encoder, {2 * cfg.rank} tokens: {_count(own):,} trainable",
                  lambda p, *_: {"prompt_embeddings": adapters.p_tuning_prompt(p)})


NUM_TASKS = 2  # multitask prompt tuning and Poly: task id = first token mod 2


def _task_ids(tokens: jax.Array) -> jax.Array:
    return (tokens[:, 0] % NUM_TASKS).astype(jnp.int32)


def _multitask(cfg, params, run, key, *, init_data=None):
    """Multitask prompt tuning: a shared prompt times per-task rank-1 factors."""
    table = params["embed_tokens"]["embedding"]
    own = adapters.multitask_prompt_tuning(key, 2 * cfg.rank, table, num_tasks=NUM_TASKS,
                                           init=adapters.PromptInit.SAMPLE_VOCAB)
    return _setup("multitask_prompt_tuning", params, own, run,
                  f"{NUM_TASKS}-task prompt, {2 * cfg.rank} tokens: {_count(own):,} trainable",
                  lambda p, tokens, *_: {
                      "prompt_embeddings": adapters.multitask_prompt(p, _task_ids(tokens))})


def _dept(cfg, params, run, key, *, init_data=None):
    """DePT: a ``rank``-token prompt and a rank-``rank`` offset of the input
    embeddings by position (over the block); one learning rate here (the
    paper's two: ``optax.partition`` with ``adapters.dept_labels()``)."""
    table = params["embed_tokens"]["embedding"]
    m = cfg.rank
    own = adapters.dept(key, m, table, rank=cfg.rank, max_length=cfg.block_len,
                        init=adapters.PromptInit.SAMPLE_VOCAB)

    def forward(p, tokens, graphdef, base, mask):
        from peftjax import models

        # the tokens enter as embeddings: a prompt over zero tokens, causal, so
        # right padding never reaches a real token
        h0 = adapters.dept_embeddings(p, base["embed_tokens"]["embedding"][tokens])
        return models.apply(graphdef, base, tokens[:, :0], prompt_embeddings=h0,
                            keep_prompt_logits=True)[:, m:]

    return _setup("dept", params, own, run,
                  f"DePT, {m} tokens + rank-{cfg.rank} offset: {_count(own):,} trainable",
                  forward=forward)


def _cpt(cfg, params, run, key, *, init_data=None):
    """CPT: the first ``2·rank`` tokens of a training block as the context,
    all of type "input" (radius 0.1·√(d/2048)); the block's LM loss trains the
    delta (no labelled few-shot context here, so not CPT's decayed loss)."""
    del key
    if init_data is None or not init_data.batches:
        raise ValueError("--method=cpt needs init_data batches (its context is training "
                         "text)")
    ids = np.asarray(init_data.batches[0]["tokens"])[0, :2 * cfg.rank].tolist()
    own = adapters.cpt(ids, params["embed_tokens"]["embedding"])
    types = [1] * len(ids)
    return _setup("cpt", params, own, run,
                  f"CPT context of {len(ids)} tokens: {own.delta.size:,} trainable",
                  lambda p, *_: {"prompt_embeddings": adapters.cpt_prompt(p, types)},
                  train="delta")


def _cartridge(cfg, params, run, key, *, init_data=None):
    """Cartridge: ``2·rank`` KV-prefix tokens, the first one frozen."""
    c = _config("cartridge", init_data)
    own = adapters.cartridge(key, 2 * cfg.rank, num_layers=c.num_hidden_layers,
                             num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim)
    return _setup("cartridge", params, own, run,
                  f"cartridge, {2 * cfg.rank} tokens (1 frozen): "
                  f"{_count(own.trainable):,} trainable",
                  lambda p, *_: {"prefix": adapters.cartridge_kv(p)}, train="trainable/.*")


def _adaption_prompt(cfg, params, run, key, *, init_data=None):
    """LLaMA-Adapter: ``rank`` gated prompt tokens in the top half of the layers."""
    c = _config("adaption_prompt", init_data)
    n = max(1, c.num_hidden_layers // 2)
    own = adapters.adaption_prompt(key, hidden_size=c.hidden_size, adapter_len=cfg.rank,
                                   adapter_layers=n)
    return _setup("adaption_prompt", params, own, run,
                  f"adaption prompts {own.prompt.shape} + {n} gates: {_count(own):,} "
                  "trainable",
                  lambda p, *_: {"hooks": adapters.AdaptionPromptHook(
                      p, num_layers=c.num_hidden_layers)})


def _alora(cfg, params, run, key, *, init_data=None):
    """aLoRA on the attention projections, active from the last occurrence of
    the invocation token in each block: the most frequent token of the
    statistics batches (a space or a newline)."""
    c = _config("alora", init_data)
    if init_data is None or not init_data.batches:
        raise ValueError("--method=alora needs init_data batches (its invocation token)")
    toks = np.concatenate([np.asarray(b["tokens"]).ravel() for b in init_data.batches])
    invocation = [int(np.bincount(toks).argmax())]
    where = r"layers/self_attn/(q_proj|k_proj|v_proj|o_proj)/kernel"
    assignment = tree.assign(params, [tree.Rule(where=where,
                                                then=adapters.lora(cfg.rank,
                                                                   alpha=cfg.alpha))])
    own = dict(adapters.init(assignment, key, params).trainable)

    def inputs(p, tokens, graphdef, base, mask):
        start = adapters.alora_starts(tokens, invocation, mask)
        return {"hooks": adapters.alora_hook(assignment, p, start,
                                             num_layers=c.num_hidden_layers)}

    return _setup("alora", params, own, run,
                  f"aLoRA r={cfg.rank} on q,k,v,o from token {invocation[0]}: "
                  f"{_count(own):,} trainable", inputs)


def _poly(cfg, params, run, key, *, init_data=None):
    """Poly: 4 LoRA skills of rank ``rank/2`` per attention projection, mixed per
    task (first token mod 2) by a learned router (sigmoid routing)."""
    r = max(1, cfg.rank // 2)
    own = adapters.poly_init(key, params, target_modules=["q_proj", "k_proj", "v_proj",
                                                          "o_proj"],
                             r=r, n_tasks=NUM_TASKS, n_skills=4)
    return _setup("poly", params, own, run,
                  f"Poly, 4 skills of r={r}, {NUM_TASKS} tasks: {_count(own):,} trainable",
                  lambda p, tokens, *_: {"hooks": adapters.PolyHook(p, _task_ids(tokens))})


def _xlora(cfg, params, run, key, *, init_data=None):
    """X-LoRA: a classifier (depth 1) over 2 frozen random LoRA experts of rank
    ``rank`` on the attention projections; only the classifier trains."""
    c = _config("xlora", init_data)
    k = 2
    config = adapters.XLoraConfig(n_experts=k, sites=ATTN_SITES,
                                  n_layers=c.num_hidden_layers, hidden_size=c.hidden_size)
    ka, kb, kc = jax.random.split(key, 3)
    attn = params["layers"]["self_attn"]
    la, lb, sc = {}, {}, {}
    for i, site in enumerate(ATTN_SITES):
        n_layers, n_in, n_out = attn[site.split("/")[1]]["kernel"].shape
        la[site] = jax.random.normal(jax.random.fold_in(ka, i),
                                     (n_layers, k, n_in, cfg.rank)) / np.sqrt(n_in)
        lb[site] = 0.1 * jax.random.normal(jax.random.fold_in(kb, i),
                                           (n_layers, k, cfg.rank, n_out))
        sc[site] = jnp.full((k,), cfg.alpha / cfg.rank)
    own = {"classifier": adapters.xlora_init(kc, config),
           "experts": adapters.XLoraExperts(la, lb, sc)}

    def forward(p, tokens, graphdef, base, mask):
        logits, _ = adapters.xlora_forward(graphdef, base, tokens, p["classifier"],
                                           p["experts"], config, attention_mask=mask)
        return logits

    return _setup("xlora", params, own, run,
                  f"X-LoRA classifier over {k} frozen experts: "
                  f"{_count(own['classifier']):,} trainable", forward=forward,
                  train="classifier/.*")


INPUT_METHODS: dict[str, Callable[..., Setup]] = {
    "prompt_tuning": _prompt_tuning,
    "prefix_tuning": _prefix_tuning,
    "p_tuning": _p_tuning,
    "multitask_prompt_tuning": _multitask,
    "dept": _dept,  # prompt m·d + position offset r·(block + d)
    "cpt": _cpt,
    "cartridge": _cartridge,
    "adaption_prompt": _adaption_prompt,  # hook: gated attention to prompts
    "alora": _alora,  # hook: LoRA from the invocation token on
    "poly": _poly,  # hook: per-task mixture of LoRA skills
    "xlora": _xlora,  # hook: two passes, classifier-scaled experts
}
