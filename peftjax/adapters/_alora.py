# SPDX-License-Identifier: Apache-2.0
"""aLoRA: a LoRA that acts only from an invocation token sequence on.

Activated LoRA: Fine-tuned LLMs for Intrinsics. Greenewald, Lastras, Rigotti,
Chaudhury, Shah, Nadolny & Ciftci, 2025. https://arxiv.org/abs/2504.12397

The paper (§3) keeps the base weights for every token before the adapter is
"activated" and applies a LoRA update only from the invocation sequence on,
so the keys and values of the prefix are the base model's and its KV cache
can be reused:
``y_t = W x_t + s·[t >= start]·B A x_t`` (torch layout; Flax: ``x A B``),
with ``start`` the slot where the invocation sequence begins. Hugging Face
PEFT (``LoraConfig(alora_invocation_tokens=...)``, ``ALoraLinearVariant``),
followed here, defines ``start`` per row as the first slot of the *last*
occurrence of the invocation tokens in ``input_ids`` (the invocation tokens
themselves are adapted); a row without an occurrence is the base model
everywhere. In generation PEFT computes the starts once from the prompt and
keeps the adapter on for every generated token (a later occurrence in the
generated text does not move the start): a hook with fixed ``start`` does
the same with peftjax's KV-cache ``generate``.

Since the update depends on the position, it is no weight reparametrisation
but a model hook (``peftjax.models.Hooks``): the trainable tree and the PEFT
files are plain LoRA (``adapters.lora``; ``alora_invocation_tokens`` in the
config), and ``alora_hook`` turns a LoRA state into the hook,
``alora_starts`` computes the per-row starts from the tokens (pure, jittable).
Per row and adapted projection it costs LoRA's ``2·r·(in + out)`` FLOPs
(every row is computed and the inactive ones masked, as a batched matmul is
cheaper than a gather). PEFT's dropout on the adapter input is not applied
(the hook is for evaluation and dropout-free training).

Exports: ``ALoRAHook``, ``alora_hook``, ``alora_starts``.
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.adapters import _hooks, _lora

# A start past any slot: the row is never adapted (no invocation found).
NEVER = np.iinfo(np.int32).max


def alora_starts(tokens: jax.Array, invocation_tokens: Sequence[int] | jax.Array,
                 mask: jax.Array | None = None) -> jax.Array:
    """Per row, the slot where the last invocation sequence starts.

    As PEFT's ``calculate_alora_offsets``: the last occurrence of the whole
    sequence; PEFT's offset counted from the end is ``T - start``.

    Args:
      tokens: ``(B, T)`` int token ids.
      invocation_tokens: the ``k`` ids (``k`` static: a sequence or a ``(k,)``
        array).
      mask: optional ``(B, T)``; occurrences touching a masked-out (0) slot
        are ignored (PEFT has no mask: ``None`` is PEFT's behaviour).

    Returns:
      ``(B,)`` int32 starts; ``alora.NEVER`` (int32 max) for a row without
      an occurrence (then the hook leaves the row unadapted).

    Raises:
      ValueError: ``tokens`` not 2-D or an empty ``invocation_tokens``.

    Example:
      >>> import jax.numpy as jnp
      >>> toks = jnp.array([[5, 7, 8, 1, 7, 8, 2], [1, 2, 3, 4, 5, 6, 7]])
      >>> alora_starts(toks, [7, 8]).tolist()
      [4, 2147483647]
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"alora_starts: tokens must be (B, T), got shape {tokens.shape}")
    inv = jnp.asarray(invocation_tokens, tokens.dtype).reshape(-1)
    k, t = inv.shape[0], tokens.shape[1]
    if k == 0:
        raise ValueError("alora_starts: invocation_tokens is empty")
    b = tokens.shape[0]
    if k > t:
        return jnp.full((b,), NEVER, jnp.int32)
    n = t - k + 1
    ok = jnp.ones((b, n), jnp.bool_)
    valid = None if mask is None else jnp.asarray(mask).astype(jnp.bool_)
    for j in range(k):
        ok = ok & (tokens[:, j:j + n] == inv[j])
        if valid is not None:
            ok = ok & valid[:, j:j + n]
    idx = jnp.arange(n, dtype=jnp.int32)
    last = jnp.max(jnp.where(ok, idx[None, :], -1), axis=1)
    return jnp.where(last >= 0, last, NEVER).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ALoRAHook(_hooks.Hooks):
    """The aLoRA model hook: LoRA on the named projections from ``start`` on.

    A ``Hooks`` (``peftjax.adapters.Hooks`` = ``peftjax.models.Hooks``) and
    a JAX pytree, so ``llama.generate(..., hooks=)`` and ``jax.grad`` take it.

    Attributes:
      a: ``{name: (L, in, r)}`` per projection name inside a layer
        (``"self_attn/q_proj"``), stacked over layers.
      b: ``{name: (L, r, out)}``.
      scale: ``{name: (L,)}`` the LoRA scaling per layer (0 for a layer the
        adapter does not touch).
      start: ``(B,)`` int32, the first adapted slot per row
        (``alora_starts``; model slots: with a soft prompt of ``P`` tokens
        before the tokens, add ``P``).
    """

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    scale: dict[str, jax.Array]
    start: jax.Array

    def linear(self, site: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        """``y + s·[slot >= start]·(x A) B`` on the adapted projections."""
        if site.name not in self.a:
            return y
        a, b = self.a[site.name], self.b[site.name]
        layer = site.layer
        s = jnp.take(self.scale[site.name], layer, mode="fill", fill_value=0)
        delta = (x.astype(a.dtype) @ a[layer]) @ b[layer] * s.astype(a.dtype)
        on = site.slots[None, :] >= self.start[:, None]
        return y + jnp.where(on[..., None], delta, 0).astype(y.dtype)

    def attention(self, site: Any, q: jax.Array, attn: Any) -> None:
        """No extra attention output."""
        del site, q, attn
        return None


_PATH = re.compile(r"(\d+/)?(.+)/kernel")


def _scale(adapter: Any, path: str) -> float:
    """The adapter's scaling ``s``: its delta of ``1 x 1`` unit factors.

    (LoRA's scale does not depend on the shapes: one small compile for all.)
    """
    if getattr(adapter, "factored", None) is None or adapter.factored.terms is None:
        raise ValueError(f"alora_hook: {adapter!r} on {path!r} has no factored form")
    one = np.ones((1, 1), np.float32)
    with jax.ensure_compile_time_eval():
        terms = adapter.factored.terms(one, _lora.LoRAParams(one, one), None)
        return float(np.asarray(terms.delta(one))[0, 0])


def alora_hook(
    assignment: Mapping[str, Any],
    trainable: Mapping[str, Any],
    start: jax.Array,
    *,
    num_layers: int,
    layers_prefix: str = "layers",
) -> ALoRAHook:
    """Builds the aLoRA hook from a LoRA assignment and its trainable tree.

    Differentiable in ``trainable`` (build it inside the loss to train an
    aLoRA with the LoRA state's optimizer).

    Args:
      assignment: ``{path: Adapter}`` of ``adapters.lora`` adapters (e.g.
        ``load_peft(...).assignment``), on kernels inside the layers, in the
        unrolled (``layers/3/mlp/up_proj/kernel``) or scanned
        (``layers/mlp/up_proj/kernel``) layout.
      trainable: ``{path: LoRAParams}`` (``state.trainable``).
      start: ``(B,)`` int32 first adapted slot per row (``alora_starts``).
      num_layers: the model's number of layers.
      layers_prefix: the layer container path.

    Returns:
      An ``ALoRAHook`` for ``model(..., hooks=)`` / ``generate(..., hooks=)``.

    Raises:
      ValueError: a path outside the layers or not a kernel, a trainable
        that is not ``LoRAParams`` (DoRA, other methods), or a stacked leaf
        whose layer count is not ``num_layers``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"layers": {"mlp": {"up_proj": {"kernel": jnp.ones((2, 4, 6))}}}}
      >>> a = tree.assign(params, [tree.Rule(where="layers/mlp/up_proj/kernel",
      ...                                    then=adapters.lora(2, alpha=4.0))])
      >>> st = adapters.init(a, jax.random.key(0), params)
      >>> hook = alora_hook(a, st.trainable, jnp.array([3]), num_layers=2)
      >>> hook.a["mlp/up_proj"].shape, hook.scale["mlp/up_proj"].tolist()
      ((2, 4, 2), [2.0, 2.0])
    """
    per: dict[str, dict[int | None, tuple]] = {}
    head = layers_prefix.rstrip("/") + "/"
    for path, adapter in assignment.items():
        m = _PATH.fullmatch(path[len(head):]) if path.startswith(head) else None
        if m is None:
            raise ValueError(
                f"alora_hook: {path!r} is not a kernel inside {layers_prefix!r} "
                "(the hook acts on the projections inside the layers only)")
        t = trainable[path]
        if not isinstance(t, _lora.LoRAParams):
            raise ValueError(f"alora_hook: {path!r} holds {type(t).__name__}; aLoRA "
                             "takes plain LoRA (LoRAParams)")
        layer = None if m.group(1) is None else int(m.group(1)[:-1])
        per.setdefault(m.group(2), {})[layer] = (t, _scale(adapter, path))
    a, b, scale = {}, {}, {}
    for name, items in per.items():
        if None in items:
            t, s = items[None]
            if t.a.ndim != 3 or t.a.shape[0] != num_layers:
                raise ValueError(f"alora_hook: stacked {name!r} has shape {t.a.shape}; "
                                 f"expected ({num_layers}, in, r)")
            a[name], b[name] = t.a, t.b
            scale[name] = jnp.full((num_layers,), s, jnp.float32)
            continue
        bad = [i for i in items if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"alora_hook: {name!r} layers {bad} outside "
                             f"num_layers={num_layers}")
        t0 = next(iter(items.values()))[0]
        za, zb = jnp.zeros_like(t0.a), jnp.zeros_like(t0.b)
        a[name] = jnp.stack([items[i][0].a if i in items else za for i in range(num_layers)])
        b[name] = jnp.stack([items[i][0].b if i in items else zb for i in range(num_layers)])
        scale[name] = jnp.asarray([items[i][1] if i in items else 0.0
                                   for i in range(num_layers)], jnp.float32)
    return ALoRAHook(a=a, b=b, scale=scale, start=jnp.asarray(start, jnp.int32))
