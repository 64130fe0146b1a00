# SPDX-License-Identifier: Apache-2.0
"""Adaption prompts (LLaMA-Adapter): a zero-gated attention over learned prompts.

LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention. Zhang, Han, Liu, Gao et al., 2023. https://arxiv.org/abs/2303.16199

In each of the top ``adapter_layers`` layers a learnable prompt
``P_l (K, d)`` (``adapter_len = K``) is projected by the layer's own key and
value projections; every query attends to these ``K`` adapter keys with its
own softmax, scaled by a gate ``g_l`` initialised to zero (paper Eq. 8:
``S_g = [softmax(S_K)·g_l; softmax(S_{M+1})]``, so the base model is
unchanged at init), and the gated adapter attention is added to the layer's
attention output (Eq. 9 ``t_l^o = S_g^T [P_l W_v; t_l W_v]``, split into its
adapter and token parts). Hugging Face PEFT (``tuners/adaption_prompt``,
followed here, also for its files) uses the gate linearly (no ``tanh``),
applies no RoPE to the adapter keys (the queries are rotated), computes the
softmax in float32 over the adapter tokens only, ignores the attention mask
for the adapter tokens (every query, padded or not, sees them), and adds
``o_proj(adapter output)`` to the attention output; peftjax adds the adapter
output before ``o_proj``, which is the same as the Llama's ``o_proj`` has no
bias. With grouped-query attention query head ``h`` uses key/value head
``h // (H / KV)`` (PEFT's ``repeat_interleave``).

It is no weight reparametrisation but a model hook
(``peftjax.models.Hooks``, its ``attention``): ``adaption_prompt`` makes the
trainable ``AdaptionPromptParams`` (PEFT's init: prompts ``N(0, 1)``, gates
0) and ``AdaptionPromptHook(params, num_layers)`` applies them, in
``model(...)`` and in KV-cache ``generate`` alike (the adapter keys and values
do not depend on the position). Trainable parameters:
``adapter_layers·(adapter_len·d + 1)``. Per query token and adapted layer the
hook costs ``2·K·H·D·2`` FLOPs for the scores and the weighted sum, plus
``2·K·d·2·KV·D`` for projecting the prompt once per batch.

Exports: ``AdaptionPromptParams``, ``AdaptionPromptHook``, ``adaption_prompt``.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax.adapters import _hooks


class AdaptionPromptParams(NamedTuple):
    """Trainable adaption prompts of the top ``n`` layers (bottom to top).

    Attributes:
      prompt: ``(n, adapter_len, d)`` = PEFT ``adaption_prompt`` per layer.
      gate: ``(n,)`` = PEFT ``adaption_gate`` per layer (0 at init).
    """

    prompt: jax.Array
    gate: jax.Array


def adaption_prompt(key: jax.Array, *, hidden_size: int, adapter_len: int,
                    adapter_layers: int, param_dtype: Any = jnp.float32
                    ) -> AdaptionPromptParams:
    """PEFT's initial adaption prompts: ``N(0, 1)`` prompts, zero gates.

    Args:
      key: PRNG key of the prompts.
      hidden_size: ``d``, the model's hidden size.
      adapter_len: ``K``, prompt tokens per adapted layer.
      adapter_layers: the number of adapted layers (the top ones).
      param_dtype: dtype of the parameters.

    Returns:
      ``AdaptionPromptParams``; the model is unchanged (zero gates).

    Raises:
      ValueError: a size that is not a positive int.

    Example:
      >>> import jax
      >>> p = adaption_prompt(jax.random.key(0), hidden_size=8, adapter_len=3,
      ...                     adapter_layers=2)
      >>> p.prompt.shape, p.gate.tolist()
      ((2, 3, 8), [0.0, 0.0])
    """
    for name, v in (("hidden_size", hidden_size), ("adapter_len", adapter_len),
                    ("adapter_layers", adapter_layers)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"adaption_prompt: {name} must be a positive int, got {v!r}")
    prompt = jax.random.normal(key, (adapter_layers, adapter_len, hidden_size), param_dtype)
    return AdaptionPromptParams(prompt, jnp.zeros((adapter_layers,), param_dtype))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["num_layers"])
@dataclasses.dataclass(frozen=True)
class AdaptionPromptHook(_hooks.Hooks):
    """The LLaMA-Adapter model hook (a ``peftjax.models.Hooks`` and a pytree).

    Attributes:
      params: ``AdaptionPromptParams`` of the top ``n`` layers.
      num_layers: the model's number of layers (static); layers
        ``num_layers - n ..`` are adapted.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax.models import Site
      >>> p = adaption_prompt(jax.random.key(1), hidden_size=8, adapter_len=2,
      ...                     adapter_layers=1)
      >>> hook = AdaptionPromptHook(p._replace(gate=jnp.ones(1)), num_layers=2)
      >>> class Attn:  # the layer's projections: d=8 -> KV·D = 2·2
      ...     k_proj = v_proj = staticmethod(lambda x: x[:, :4])
      >>> q = jnp.ones((1, 3, 4, 2))  # (B, T, H, D), rotated queries
      >>> hook.attention(Site(jnp.int32(1), "self_attn", jnp.arange(3)), q,
      ...                Attn()).shape
      (1, 3, 4, 2)
    """

    params: AdaptionPromptParams
    num_layers: int

    def linear(self, site: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        """Projections are unchanged."""
        del site, x
        return y

    def attention(self, site: Any, q: jax.Array, attn: Any) -> jax.Array:
        """The gated attention of the rotated queries over the layer's prompt."""
        prompt, gate = self.params
        n = prompt.shape[0]
        if n > self.num_layers:
            raise ValueError(f"AdaptionPromptHook: {n} adapted layers > num_layers="
                             f"{self.num_layers}")
        idx = site.layer - (self.num_layers - n)
        on = idx >= 0
        idx = jnp.clip(idx, 0, n - 1)
        p = prompt[idx].astype(q.dtype)  # (K, d)
        b, t, h, d = q.shape
        k = attn.k_proj(p)
        v = attn.v_proj(p)
        kv = k.shape[-1] // d
        if kv * d != k.shape[-1] or h % kv:
            raise ValueError(f"AdaptionPromptHook: k_proj output {k.shape[-1]} is not "
                             f"KV·D with D={d} dividing H={h}")
        k = k.reshape(-1, kv, d).astype(q.dtype)
        v = v.reshape(-1, kv, d).astype(q.dtype)
        qg = q.reshape(b, t, kv, h // kv, d)
        scores = jnp.einsum("btkgd,skd->bkgts", qg, k) * (d ** -0.5)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        probs = probs * jnp.where(on, gate[idx], 0).astype(q.dtype)
        out = jnp.einsum("bkgts,skd->btkgd", probs, v)
        return out.reshape(b, t, h, d)
