# SPDX-License-Identifier: Apache-2.0
"""CPT: context-aware prompt tuning (the embedding side and the loss).

Context-aware Prompt Tuning: Advancing In-Context Learning with Adversarial
Methods. Blau, Kimhi, Belinkov, Bronstein & Baskin, 2024.
https://arxiv.org/abs/2410.17222

CPT turns in-context examples into a trainable prompt: the context's tokens
``c_1..c_P`` (examples' input templates, inputs, output templates and
labels) are embedded, ``E = embed(c)``, and a delta ``Δ`` is learned on top,
``prompt = E + Δ``. Each context token has a type (Hugging Face PEFT's
``cpt_tokens_type_mask``; example ``j`` uses ``4j+1`` input template,
``4j+2`` input, ``4j+3`` output template, ``4j+4`` label): the delta of
label tokens is never updated and every row of ``Δ`` is projected onto an
L2 ball (the paper's projected gradient): radius
``ε·√(d/2048)`` with ``ε`` = ``opt_projection_format_epsilon`` for template
tokens and ``opt_projection_epsilon`` for input tokens (``1e-10`` for the
rest). The loss is the cross-entropy on every label token, context
examples included; with ``"decay"`` the examples' terms are weighted
``γ^k``, ``k`` the number of examples after it (the training input itself
weighs 1).

Hugging Face PEFT (``tuners/cpt``, followed here) implements the
projection as ``Δ ← Π(Δ)`` at each forward, outside the gradient: do
``delta = cpt_project(delta, type_mask)`` before each step
(``cpt_prompt`` projects on the fly as well, with a straight-through
gradient, so the forward is right either way), and multiply the gradient
by ``cpt_update_mask`` (PEFT's backward hook; ``cpt_prompt`` does it).

``cpt_inputs`` builds PEFT's combined labels and type mask over ``[context;
input]``; ``cpt_loss`` takes logits over those ``P + T`` positions (the
context positions included: peftjax's models drop the prompt positions'
logits, so the context part needs the logits of the whole sequence).

Exports: ``CPTParams``, ``cpt``, ``cpt_project``, ``cpt_update_mask``,
``cpt_prompt``, ``cpt_inputs``, ``cpt_loss``.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_MIN_EPS = 1e-10


class CPTParams(NamedTuple):
    """CPT's prompt: frozen context embeddings and the trainable delta.

    Attributes:
      embeddings: ``(P, d)`` frozen ``embed(cpt_token_ids)`` (float32).
      delta: ``(P, d)`` trainable (PEFT ``delta_embedding``), zeros at init.
    """

    embeddings: jax.Array
    delta: jax.Array


def _type_mask(type_mask: Sequence[int] | jax.Array, n: int | None, fn: str) -> np.ndarray:
    t = np.asarray(type_mask)
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer) or (t < 0).any():
        raise ValueError(f"{fn}: tokens_type_mask must be non-negative ints (P,), got "
                         f"{t.dtype} {t.shape}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{fn}: tokens_type_mask has length {t.shape[0]}; expected P={n}")
    return t


def cpt(token_ids: Sequence[int], embedding_table: jax.Array) -> CPTParams:
    """Creates CPT's prompt from the context token ids (PEFT's init).

    Trainable parameters (PEFT's count): ``P·d`` (the delta).

    Args:
      token_ids: the context tokens ``(P,)`` (PEFT's ``cpt_token_ids``).
      embedding_table: the model's ``(V, d)`` token embeddings.

    Returns:
      ``CPTParams(embeddings=table[token_ids] (float32), delta=0)``.

    Raises:
      ValueError: empty or out-of-vocabulary ``token_ids``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = cpt([2, 0], jnp.arange(8.0).reshape(4, 2))
      >>> p.embeddings, p.delta.shape
      (Array([[4., 5.],
             [0., 1.]], dtype=float32), (2, 2))
    """
    ids = np.asarray(token_ids)
    vocab = embedding_table.shape[0]
    if ids.ndim != 1 or ids.size == 0 or ((ids < 0) | (ids >= vocab)).any():
        raise ValueError(f"cpt: token_ids must be a non-empty list of ids in [0, {vocab}), "
                         f"got {ids.tolist()[:10]}")
    emb = jnp.asarray(embedding_table)[jnp.asarray(ids)].astype(jnp.float32)
    return CPTParams(emb, jnp.zeros_like(emb))


def _epsilon(t: np.ndarray, dim: int, epsilon: float, format_epsilon: float) -> np.ndarray:
    scale = np.sqrt(np.float32(dim / 2048))
    eps = np.full(t.shape, _MIN_EPS, np.float32)
    kind = t % 4
    eps[(t > 0) & ((kind == 1) | (kind == 3))] = np.float32(format_epsilon) * scale
    eps[(t > 0) & (kind == 2)] = np.float32(epsilon) * scale
    return eps


def cpt_project(delta: jax.Array, tokens_type_mask: Sequence[int], *,
                epsilon: float = 0.1, format_epsilon: float = 0.1) -> jax.Array:
    """Projects each row of ``delta`` onto its L2 ball (PEFT's ``get_projection``).

    Args:
      delta: ``(P, d)``.
      tokens_type_mask: ``(P,)`` (PEFT's ``cpt_tokens_type_mask``), static.
      epsilon: PEFT's ``opt_projection_epsilon`` (input tokens).
      format_epsilon: PEFT's ``opt_projection_format_epsilon`` (templates).

    Returns:
      ``Δ_i · ε_i / max(‖Δ_i‖, ε_i)`` (rows of norm 0 unchanged).

    Example:
      >>> import jax.numpy as jnp
      >>> d = cpt_project(jnp.full((1, 2048), 1.0), [2])
      >>> round(float(jnp.linalg.norm(d)), 5)
      0.1
    """
    t = _type_mask(tokens_type_mask, delta.shape[0], "cpt_project")
    eps = jnp.asarray(_epsilon(t, delta.shape[1], epsilon, format_epsilon))
    norm = jnp.linalg.norm(delta.astype(jnp.float32), axis=1)
    factor = jnp.where(norm > 0, eps / jnp.maximum(norm, eps), 1.0)
    return (delta * factor[:, None]).astype(delta.dtype)


def cpt_update_mask(tokens_type_mask: Sequence[int]) -> jax.Array:
    """``(P, 1)`` float: 1 for template/input tokens, 0 for labels and type 0.

    Args:
      tokens_type_mask: ``(P,)``.

    Returns:
      PEFT's gradient mask of the delta (``type % 4`` in ``{1, 2, 3}``).

    Example:
      >>> cpt_update_mask([1, 2, 3, 4, 0]).ravel()
      Array([1., 1., 1., 0., 0.], dtype=float32)
    """
    t = _type_mask(tokens_type_mask, None, "cpt_update_mask")
    return jnp.asarray(np.isin(t % 4, (1, 2, 3)).astype(np.float32)[:, None])


def cpt_prompt(params: CPTParams, tokens_type_mask: Sequence[int], *,
               epsilon: float = 0.1, format_epsilon: float = 0.1) -> jax.Array:
    """The prompt ``E + Π(Δ)`` ``(P, d)`` with PEFT's gradient to ``Δ``.

    The forward value is PEFT's (``Π`` = ``cpt_project``); the gradient
    reaching ``Δ`` is the gradient at the prompt masked by
    ``cpt_update_mask`` (straight through ``Π``, as PEFT's in-place
    projection). ``E`` gets no gradient.

    Args:
      params: ``CPTParams``.
      tokens_type_mask: ``(P,)``, static.
      epsilon: input-token radius (before ``√(d/2048)``).
      format_epsilon: template-token radius.

    Returns:
      ``(P, d)``: peftjax's models take it as ``prompt_embeddings``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = cpt([1, 2], jnp.ones((4, 3)))
      >>> cpt_prompt(p, [1, 4]).shape
      (2, 3)
    """
    delta = params.delta
    proj = cpt_project(delta, tokens_type_mask, epsilon=epsilon, format_epsilon=format_epsilon)
    mask = cpt_update_mask(tokens_type_mask).astype(delta.dtype)
    live = delta * mask
    used = live + jax.lax.stop_gradient(proj - live)
    return jax.lax.stop_gradient(params.embeddings) + used


def cpt_inputs(labels: jax.Array, input_type_mask: jax.Array, token_ids: Sequence[int],
               tokens_type_mask: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """PEFT's labels and type mask over ``[context; input]`` (``_cpt_forward``).

    Args:
      labels: int ``(B, T)`` of the input (``-100`` ignored).
      input_type_mask: int ``(B, T)``: PEFT's ``input_type_mask`` (types as
        the context's, ``4`` for the label tokens, 0 for padding).
      token_ids: the context tokens ``(P,)``.
      tokens_type_mask: their types ``(P,)``.

    Returns:
      ``(labels (B, P+T), type_mask (B, P+T))``: the input's nonzero types
      shifted by ``max(tokens_type_mask)``; labels kept only where
      ``type > 0`` and ``type % 4 == 0`` (elsewhere ``-100``).

    Example:
      >>> import jax.numpy as jnp
      >>> lab, typ = cpt_inputs(jnp.array([[7, 8]]), jnp.array([[2, 4]]), [5, 6], [1, 4])
      >>> lab, typ
      (Array([[-100,    6, -100,    8]], dtype=int32), Array([[1, 4, 6, 8]], dtype=int32))
    """
    t = _type_mask(tokens_type_mask, len(token_ids), "cpt_inputs")
    b = labels.shape[0]
    ctx_types = jnp.broadcast_to(jnp.asarray(t, jnp.int32)[None], (b, t.shape[0]))
    ctx_labels = jnp.broadcast_to(jnp.asarray(np.asarray(token_ids), jnp.int32)[None],
                                  (b, t.shape[0]))
    inp = jnp.asarray(input_type_mask).astype(jnp.int32)
    inp = jnp.where(inp > 0, inp + int(t.max()), inp)
    types = jnp.concatenate([ctx_types, inp], axis=1)
    lab = jnp.concatenate([ctx_labels, jnp.asarray(labels).astype(jnp.int32)], axis=1)
    is_label = (types > 0) & (types % 4 == 0)
    return jnp.where(is_label, lab, -100), types


def _decay_weights(types: jax.Array, factor: float) -> jax.Array:
    """Per position: ``factor^k``, ``k`` = distinct label types above its type."""
    is_label = (types > 0) & (types % 4 == 0)
    ids = jnp.where(is_label, types, -1)
    srt = jnp.sort(ids)
    first = jnp.concatenate([jnp.ones((1,), jnp.bool_), srt[1:] != srt[:-1]]) & (srt >= 0)
    cum = jnp.cumsum(first.astype(jnp.int32))
    total = cum[-1]
    pos = jnp.searchsorted(srt, types, side="right")
    below = jnp.where(pos > 0, cum[jnp.maximum(pos - 1, 0)], 0)
    k = total - below
    return jnp.where(is_label, jnp.asarray(factor, jnp.float32) ** k.astype(jnp.float32), 1.0)


def cpt_loss(logits: jax.Array, labels: jax.Array, type_mask: jax.Array, *,
             loss_type: str = "none", decay_factor: float = 1.0) -> jax.Array:
    """CPT's loss (PEFT's ``CPTEmbedding.calculate_loss``).

    Next-token cross-entropy (logits at ``s`` predict ``labels[s+1]``) over
    the positions with ``labels != -100``, each weighted (with ``"decay"``)
    by ``decay_factor^k``, ``k`` the number of label types of the row above
    its own; the weighted terms' mean.

    Args:
      logits: ``(B, S, V)`` over ``[context; input]``.
      labels: int ``(B, S)`` from ``cpt_inputs``.
      type_mask: int ``(B, S)`` from ``cpt_inputs``.
      loss_type: ``"none"`` or ``"decay"`` (PEFT's ``opt_weighted_loss_type``).
      decay_factor: PEFT's ``opt_loss_decay_factor``.

    Returns:
      The scalar float32 loss.

    Raises:
      ValueError: an unknown ``loss_type`` or mismatched shapes.

    Example:
      >>> import jax.numpy as jnp
      >>> lab, typ = cpt_inputs(jnp.array([[1, 2]]), jnp.array([[2, 4]]), [0, 3], [1, 4])
      >>> float(cpt_loss(jnp.zeros((1, 4, 5)), lab, typ))  # doctest: +ELLIPSIS
      1.609...
    """
    if loss_type not in ("none", "decay"):
        raise ValueError(f"cpt_loss: loss_type must be 'none' or 'decay', got {loss_type!r}")
    if labels.shape != logits.shape[:2] or type_mask.shape != labels.shape:
        raise ValueError(f"cpt_loss: logits {logits.shape}, labels {labels.shape} and "
                         f"type_mask {type_mask.shape} must share (B, S)")
    lg = logits[:, :-1].astype(jnp.float32)
    lab = labels[:, 1:]
    types = type_mask[:, 1:]
    valid = lab != -100
    logp = jax.nn.log_softmax(lg, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, lab, 0)[..., None], axis=-1)[..., 0]
    w = jnp.ones(lab.shape, jnp.float32)
    if loss_type == "decay":
        w = jax.vmap(lambda t: _decay_weights(t, decay_factor))(types)
    num = jnp.sum(jnp.where(valid, nll * w, 0.0))
    return num / jnp.sum(valid).astype(jnp.float32)
