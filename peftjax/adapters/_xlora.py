# SPDX-License-Identifier: Apache-2.0
"""X-LoRA: a mixture of LoRA experts gated per token by the model's own hidden states.

X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible Framework for Large
Language Models with Applications in Protein Mechanics and Molecular Design.
Buehler & Buehler, 2024. https://arxiv.org/abs/2402.07148

The paper (Sec. 2, Fig. 1) runs the model twice. A first *scaling pass*
produces hidden states ``h``; an X-LoRA classifier (an MLP of
``xlora_depth`` layers, width ``xlora_size``, ReLU) maps them to per-token
scalings ``λ (B, T, n_layers, n_experts)`` (softmax over experts with a
temperature); the second pass adds, at every adapted projection ``m``,
``Σ_k λ_{t,m,k} · B_k A_k x_t · s_k`` (``s_k`` the expert LoRA's own
``alpha/r``).

Hugging Face PEFT's ``tuners/xlora`` (followed here, also for its files):

* The scaling pass runs the experts with *dummy* scalings, every entry
  ``scaling_pass_value`` (default 0: the base model), through the same
  top-k/softmax-top-k as the second pass, without gradients; the classifier
  reads the last entry of ``output_hidden_states``, which is the
  *final-normed* hidden state (``model(..., return_hidden=True)``'s).
* "Layers" are PEFT's adapted modules, numbered in module order (layer by
  layer, Llama: q, k, v, o, gate, up, down; only the adapted ones); without
  ``layerwise_scalings`` the classifier's ``n_experts`` logits are shared by
  all of them, with it it outputs ``n_modules·n_experts``.
* Per module: ``top_k_lora`` keeps the ``k`` largest scalings (others 0);
  ``enable_softmax_topk`` then softmaxes over the nonzero ones; the update
  is ``Σ_k B_k A_k (x·λ_k) · s_k · global_scaling_weight``.
* Generation: PEFT's ``generate`` forces ``use_cache=False``, so every step
  reruns both passes on the whole sequence. Both passes are causal, so the
  scalings at a position depend on the tokens up to it only;
  ``xlora_generate`` decodes with two KV caches (one per pass) and gives the
  same tokens (tests compare it with full passes).
* The experts are frozen (``use_trainable_adapters=False``, PEFT's
  default); the classifier is the trainable part.

Per row: one extra forward of the model (the scaling pass; under
``stop_gradient``), the classifier, and ``2·Σ_k r_k·(in+out)`` FLOPs per
adapted projection (all experts; top-k zeros the others' scalings without
skipping them, as PEFT).

Exports: ``XLoraConfig``, ``XLoraClassifier``, ``XLoraExperts``,
``XLoraHook``, ``xlora_init``, ``xlora_scalings``, ``xlora_forward``,
``xlora_generate``.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax.adapters import _hooks

# PEFT's module order inside one layer (torch's module traversal)
SITE_ORDER = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
              "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj",
              "attention/query", "attention/key", "attention/value",
              "attention/output", "intermediate", "output")


class XLoraConfig(NamedTuple):
    """PEFT's ``XLoraConfig`` fields that change the computation.

    Attributes:
      n_experts: the number of LoRA experts (PEFT's ``len(adapters)``).
      sites: the adapted projections' site names in PEFT's module order.
      n_layers: the model's layers (``n_modules = n_layers·len(sites)``).
      hidden_size, xlora_depth, xlora_size, layerwise_scalings,
      enable_softmax, softmax_temperature, top_k_lora, enable_softmax_topk,
      scaling_pass_value, global_scaling_weight: as PEFT's.
    """

    n_experts: int
    sites: tuple[str, ...]
    n_layers: int
    hidden_size: int
    xlora_depth: int = 1
    xlora_size: int = 2048
    layerwise_scalings: bool = False
    enable_softmax: bool = True
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    enable_softmax_topk: bool = False
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    @property
    def n_modules(self) -> int:
        return self.n_layers * len(self.sites)


class XLoraClassifier(NamedTuple):
    """The trainable classifier: dense layers ``(kernel (in, out), bias (out,))``
    = PEFT's ``internal_xlora_classifier.layers.<i>`` (ReLU between)."""

    layers: tuple[tuple[jax.Array, jax.Array], ...]


class XLoraExperts(NamedTuple):
    """The frozen LoRA experts, per site (every layer), ranks zero-padded to the largest.

    Attributes:
      lora_a: ``{site: (L, K, in, r)}`` (PEFT ``lora_A.weight`` transposed).
      lora_b: ``{site: (L, K, r, out)}``.
      scaling: ``{site: (K,)}`` each expert's ``alpha/r`` (``alpha/sqrt(r)``
        with rsLoRA); 0 for an expert that does not adapt the site.
    """

    lora_a: dict[str, jax.Array]
    lora_b: dict[str, jax.Array]
    scaling: dict[str, jax.Array]


def xlora_init(key: jax.Array, config: XLoraConfig, dtype: Any = jnp.float32
               ) -> XLoraClassifier:
    """A classifier with torch ``nn.Linear``'s default init (PEFT's).

    Args:
      key: PRNG key.
      config: ``XLoraConfig``.
      dtype: of the parameters.

    Returns:
      ``XLoraClassifier``.

    Example:
      >>> cfg = XLoraConfig(n_experts=3, sites=("self_attn/q_proj",), n_layers=2,
      ...                   hidden_size=16, xlora_depth=2, xlora_size=8,
      ...                   layerwise_scalings=True)
      >>> [w.shape for w, _ in xlora_init(jax.random.key(0), cfg).layers]
      [(16, 8), (8, 6)]
    """
    if config.xlora_depth <= 0:
        raise ValueError(f"xlora_init: xlora_depth={config.xlora_depth} must be positive")
    out = config.n_experts * (config.n_modules if config.layerwise_scalings else 1)
    dims = ([config.hidden_size] + [config.xlora_size] * (config.xlora_depth - 1)
            + [out])
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        kw, kb = jax.random.split(jax.random.fold_in(key, i))
        bound = 1.0 / a**0.5
        layers.append((jax.random.uniform(kw, (a, b), dtype, -bound, bound),
                       jax.random.uniform(kb, (b,), dtype, -bound, bound)))
    return XLoraClassifier(tuple(layers))


def xlora_scalings(classifier: XLoraClassifier, hidden: jax.Array,
                   config: XLoraConfig) -> jax.Array:
    """PEFT's ``XLoraClassifier.forward``: ``(B, T, n_modules, n_experts)`` scalings.

    Args:
      classifier: ``XLoraClassifier``.
      hidden: ``(B, T, hidden_size)``, the scaling pass's final-normed hidden states.
      config: ``XLoraConfig``.

    Returns:
      The scalings (softmax over experts with the temperature when
      ``enable_softmax``).

    Example:
      >>> cfg = XLoraConfig(n_experts=2, sites=("mlp/up_proj",), n_layers=3,
      ...                   hidden_size=4)
      >>> clf = xlora_init(jax.random.key(0), cfg)
      >>> s = xlora_scalings(clf, jnp.ones((1, 5, 4)), cfg)
      >>> s.shape, round(float(s[0, 0, 0].sum()), 5)
      ((1, 5, 3, 2), 1.0)
    """
    h = hidden
    for i, (w, b) in enumerate(classifier.layers):
        h = h @ w.astype(h.dtype) + b.astype(h.dtype).reshape((1,) * (h.ndim - 1) + (-1,))
        if i + 1 < len(classifier.layers):
            h = jax.nn.relu(h)
    bsz, t = hidden.shape[:2]
    m, k = config.n_modules, config.n_experts
    if config.layerwise_scalings:
        s = h.reshape(bsz, t, m, k)
    else:
        s = jnp.broadcast_to(h[:, :, None, :], (bsz, t, m, k))
    if config.enable_softmax:
        s = jax.nn.softmax(s / config.softmax_temperature, axis=-1)
    return s


def _topk(s: jax.Array, config: XLoraConfig) -> jax.Array:
    """PEFT's ``get_maybe_topk_scalings`` on one module's ``(B, T, K)`` scalings."""
    if config.top_k_lora is not None:
        _, idx = jax.lax.top_k(s, config.top_k_lora)
        mask = jnp.sum(jax.nn.one_hot(idx, s.shape[-1], dtype=s.dtype), axis=-2) > 0
        s = s * mask.astype(s.dtype)
    if config.enable_softmax_topk:
        nz = s != 0
        full = jnp.where(nz, s, -jnp.inf)
        safe = jnp.where(nz.any(-1, keepdims=True), full, 0.0)
        s = jnp.where(nz, jax.nn.softmax(safe, axis=-1), 0.0)
    return s


@functools.partial(jax.tree_util.register_dataclass, data_fields=["experts", "scalings"],
                   meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class XLoraHook(_hooks.Hooks):
    """The experts applied with given scalings, as a ``peftjax.models.Hooks``.

    Attributes:
      experts: ``XLoraExperts``.
      scalings: ``(B, T, n_modules, n_experts)`` for the tokens of this call.
      config: ``XLoraConfig`` (static).
    """

    experts: XLoraExperts
    scalings: jax.Array
    config: XLoraConfig

    def attention(self, site: Any, q: jax.Array, attn: Any) -> None:
        """No extra attention."""
        del site, q, attn

    def linear(self, site: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        """``y + Σ_k B_k A_k (x·λ_k) s_k · global_scaling_weight``."""
        if site.name not in self.experts.lora_a:
            return y
        cfg = self.config
        module = site.layer * len(cfg.sites) + cfg.sites.index(site.name)
        lam = _topk(jax.lax.dynamic_index_in_dim(self.scalings, module, 2, False), cfg)
        a = self.experts.lora_a[site.name][site.layer]  # (K, in, r)
        b = self.experts.lora_b[site.name][site.layer]  # (K, r, out)
        sc = self.experts.scaling[site.name].astype(a.dtype) * cfg.global_scaling_weight
        h = jnp.einsum("bti,kir->btkr", x.astype(a.dtype), a) * lam.astype(a.dtype)[..., None]
        delta = jnp.einsum("btkr,kro,k->bto", h, b, sc)
        return y + delta.astype(y.dtype)


def _dummy(config: XLoraConfig, b: int, t: int, dtype: Any) -> jax.Array:
    return jnp.full((b, t, config.n_modules, config.n_experts),
                    config.scaling_pass_value, dtype)


def xlora_forward(graphdef: Any, params: Any, tokens: jax.Array,
                  classifier: XLoraClassifier, experts: XLoraExperts,
                  config: XLoraConfig, **kwargs: Any) -> tuple[jax.Array, jax.Array]:
    """PEFT's X-LoRA forward: the scaling pass, the classifier, the second pass.

    Args:
      graphdef, params: the model (``models.split_params``); a Llama (the
        classifier reads ``return_hidden``).
      tokens: ``(B, T)``.
      classifier, experts, config: the X-LoRA parts.
      **kwargs: forwarded to the model (``attention_mask=``...).

    Returns:
      ``(logits, scalings)``.

    Example: see ``xlora_generate`` (the same parts, a forward and a decode).
    """
    from flax import nnx  # imported lazily: peftjax.adapters needs no flax

    b, t = tokens.shape
    dtype = next(iter(experts.lora_a.values())).dtype
    model = nnx.merge(graphdef, params)
    _, hidden = model(tokens, return_hidden=True,
                      hooks=XLoraHook(experts, _dummy(config, b, t, dtype), config),
                      **kwargs)
    scalings = xlora_scalings(classifier, jax.lax.stop_gradient(hidden), config)
    logits = model(tokens, hooks=XLoraHook(experts, scalings, config), **kwargs)
    return logits, scalings


def xlora_generate(model: Any, prompt: jax.Array, classifier: XLoraClassifier,
                   experts: XLoraExperts, config: XLoraConfig, *,
                   max_new_tokens: int) -> jax.Array:
    """Greedy decoding with X-LoRA and two KV caches (scaling pass, second pass).

    Equals PEFT's ``generate`` (which reruns both passes on the whole
    sequence each step, ``use_cache=False``): both passes are causal.

    Args:
      model: a ``llama.LlamaForCausalLM``.
      prompt: int ``(B, P)`` (no padding).
      classifier, experts, config: the X-LoRA parts.
      max_new_tokens: N.

    Returns:
      int32 ``(B, N)``.

    Example:
      >>> from flax import nnx
      >>> from peftjax import models as pm
      >>> from peftjax.models import llama
      >>> from peftjax.models.llama import _tiny
      >>> m = llama.LlamaForCausalLM(_tiny.tiny_config(
      ...     num_hidden_layers=1, hidden_size=16, intermediate_size=32,
      ...     vocab_size=32), rngs=nnx.Rngs(0))
      >>> d = m.config.hidden_size
      >>> cfg = XLoraConfig(n_experts=2, sites=("self_attn/q_proj",), n_layers=1,
      ...                   hidden_size=d)
      >>> ex = XLoraExperts({"self_attn/q_proj": jnp.ones((1, 2, d, 1))},
      ...                   {"self_attn/q_proj": jnp.ones((1, 2, 1, d))},
      ...                   {"self_attn/q_proj": jnp.ones((2,))})
      >>> clf = xlora_init(jax.random.key(0), cfg)
      >>> gdef, params = pm.split_params(m)
      >>> toks = jnp.zeros((1, 3), jnp.int32)
      >>> fwd = jax.jit(lambda t: xlora_forward(gdef, params, t, clf, ex, cfg))
      >>> logits, s = fwd(toks)
      >>> s.shape  # (B, T, n_modules, n_experts)
      (1, 3, 1, 2)
      >>> xlora_generate(m, toks, clf, ex, cfg, max_new_tokens=2).shape
      (1, 2)
    """
    from flax import nnx

    gdef, state = nnx.split(model)
    return _generate(gdef, state, prompt, classifier, experts, config, max_new_tokens)


def _decode_both(model, toks, c1, c2, classifier, experts, config):
    b, t = toks.shape
    dtype = next(iter(experts.lora_a.values())).dtype
    (_, hidden), c1 = model.decode(
        toks, c1, return_hidden=True,
        hooks=XLoraHook(experts, _dummy(config, b, t, dtype), config))
    s = xlora_scalings(classifier, hidden, config)
    logits, c2 = model.decode(toks, c2, hooks=XLoraHook(experts, s, config))
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), c1, c2


@jax.jit(static_argnames=("gdef", "config", "max_new_tokens"))
def _generate(gdef, state, prompt, classifier, experts, config, max_new_tokens):
    from flax import nnx

    model = nnx.merge(gdef, state)
    b, p = prompt.shape
    dt = model.embed_tokens.embedding.dtype
    c1 = model.init_cache(b, p + max_new_tokens, dtype=dt)
    c2 = model.init_cache(b, p + max_new_tokens, dtype=dt)
    first, c1, c2 = _decode_both(model, prompt, c1, c2, classifier, experts, config)

    def step(carry, _):
        tok, c1, c2 = carry
        nxt, c1, c2 = _decode_both(model, tok[:, None], c1, c2, classifier, experts,
                                   config)
        return (nxt, c1, c2), nxt

    _, rest = jax.lax.scan(step, (first, c1, c2), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)
