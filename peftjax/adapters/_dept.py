# SPDX-License-Identifier: Apache-2.0
"""DePT: a short soft prompt plus a low-rank, position-wise offset of the input embeddings.

DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning. Shi &
Lipani, ICLR 2024. https://arxiv.org/abs/2309.05173 (authors' code:
github.com/ZhengxiangShi/DePT).

Vanilla prompt tuning trains ``l`` prompt vectors ``P (l, d)`` prepended to
the input embeddings. DePT (§2 of the paper) spends the same budget on a
shorter prompt ``P_s (m, d)`` and a pair of low-rank matrices
``A (s, r)``, ``B (r, d)`` that update the frozen input embeddings of the
sequence, ``E_i (s, d)`` for an input of (at most) ``s`` tokens:

    E'_i = E_i + s_c · A B,        h_0 = [P_s ; E'_i]

with ``s_c = alpha / sqrt(r)`` (the authors' code, ``lora_alpha / sqrt(r)``,
``lora_alpha = 8``; the paper writes ``E_i + A B``). The offset is indexed
by *position*, not by token id: row ``t`` of ``A B`` is added to whatever
token sits at position ``t`` (the authors pad every input to
``max_length = s``; here an input of ``T <= s`` tokens takes the first ``T``
rows). The budget matches prompt tuning of length ``l`` when
``m·d + r·(s + d) = l·d`` (the authors' T5-Base runs: ``l = 100`` as
``m = 40, r = 45`` at ``s = 256``). Training uses two learning rates, a
large one for ``P_s`` and usually a smaller one for ``A, B`` (the authors'
GLUE script searches 3e-1, 4e-1 for the prompt and 5e-3, 3e-1, 5e-4 for
``A, B``): ``optax.partition`` with ``dept_labels``.

Initialisation follows the authors' code: ``A`` kaiming-uniform
(``U(-1/sqrt(r), 1/sqrt(r))``, torch's ``kaiming_uniform_(a=sqrt(5))`` on an
``(s, r)`` matrix), ``B = 0`` (so ``E'_i = E_i`` at init), the prompt as in
``prompt_tuning`` (``PromptInit``; the authors' config defaults to random,
their scripts to a text init).

Like prompt tuning this is not an ``Adapter``: it changes no leaf of the
base tree (the embedding *table* is untouched: the offset depends on the
position, so no reparametrisation of the ``(vocab, d)`` table expresses it).
It is an input of the model: ``dept_embeddings`` builds ``h_0`` from the
looked-up token embeddings, and peftjax's Llama consumes it as a soft prompt
covering the whole input (``prompt_embeddings=h_0`` with zero tokens,
``keep_prompt_logits=True``; see ``dept_embeddings``). ``llama.generate``
needs at least one token after its soft prompt, so it does not take DePT's
input yet (the authors offset the input ids only, never generated tokens:
a generate that starts from embeddings alone would serve). The offset costs one
``(T, r) @ (r, d)`` product per sequence (``r·d`` multiply-adds per row, the
same for every example of a batch); nothing ``(vocab, d)`` or ``(s, d)`` is
stored.

Exports: ``DePTParams``, ``dept``, ``dept_embeddings``, ``dept_labels``.
"""

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax.adapters import _prompt


class DePTParams(NamedTuple):
    """DePT's trainable parameters.

    Attributes:
      prompt: ``(m, d)``, the short soft prompt ``P_s``.
      a: ``(s, r)``, the position factor ``A`` (row ``t``: position ``t``).
      b: ``(r, d)``, the embedding factor ``B`` (zero at init).
    """

    prompt: jax.Array
    a: jax.Array
    b: jax.Array


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"dept: {name} must be a positive int, got {value!r}")
    return int(value)


def dept(key: jax.Array, num_tokens: int, embedding_table: jax.Array, *, rank: int,
         max_length: int, init: _prompt.PromptInit = _prompt.PromptInit.RANDOM,
         token_ids: Sequence[int] | None = None,
         param_dtype: Any = jnp.float32) -> DePTParams:
    """Creates DePT's short prompt and low-rank input-embedding offset.

    Trainable parameters: ``m·d + r·(s + d)`` for ``m = num_tokens``,
    ``r = rank``, ``s = max_length`` and the table's width ``d``.

    Args:
      key: PRNG key.
      num_tokens: ``m``, the short prompt's length (the authors' scripts: 40
        or 60).
      embedding_table: the model's ``(V, d)`` token embeddings (read only).
      rank: ``r`` of ``A (s, r)`` and ``B (r, d)`` (the authors' scripts: 45
        with ``m = 40``, 30 with ``m = 60``).
      max_length: ``s``, the longest input the offset covers (the authors'
        ``max_length``, 256).
      init: the prompt's ``PromptInit`` (see ``prompt_tuning``).
      token_ids: the ids for ``PromptInit.TEXT``.
      param_dtype: storage dtype of all three arrays.

    Returns:
      ``DePTParams(prompt (m, d), a (s, r), b (r, d))`` with ``b = 0``.

    Raises:
      ValueError: a non-positive ``num_tokens``, ``rank`` or ``max_length``, a
        ``rank`` above ``min(max_length, d)``, a table that is not 2-D, or a bad
        ``token_ids`` (as ``prompt_tuning``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = dept(jax.random.key(0), 2, jnp.ones((10, 4)), rank=3, max_length=6)
      >>> p.prompt.shape, p.a.shape, p.b.shape, float(abs(p.b).max())
      ((2, 4), (6, 3), (3, 4), 0.0)
    """
    num_tokens = _positive(num_tokens, "num_tokens")
    rank = _positive(rank, "rank")
    max_length = _positive(max_length, "max_length")
    if getattr(embedding_table, "ndim", None) != 2:
        raise ValueError(f"dept: embedding_table must be a (vocab, d) matrix, got shape "
                         f"{getattr(embedding_table, 'shape', None)}")
    d = embedding_table.shape[1]
    if rank > min(max_length, d):
        raise ValueError(f"dept: rank {rank} exceeds min(max_length, d) = "
                         f"min({max_length}, {d})")
    kp, ka = jax.random.split(key)
    prompt = _prompt.prompt_tuning(kp, num_tokens, embedding_table, init=init,
                                   token_ids=token_ids, param_dtype=param_dtype).embeddings
    bound = 1.0 / math.sqrt(rank)  # kaiming_uniform_(a=sqrt(5)), fan_in = r
    a = jax.random.uniform(ka, (max_length, rank), jnp.float32, -bound, bound)
    return DePTParams(prompt=prompt, a=a.astype(param_dtype),
                      b=jnp.zeros((rank, d), param_dtype))


def dept_embeddings(params: DePTParams, token_embeddings: jax.Array, *,
                    alpha: float = 8.0) -> jax.Array:
    """Returns ``h_0 = [P_s ; E + (alpha/sqrt(r))·(A B)[:T]]``, the model's input embeddings.

    ``E`` are the frozen token embeddings ``(B, T, d)`` (a lookup of the
    model's table); row ``t`` of the offset is added at position ``t``.
    Feed the result to peftjax's Llama as a soft prompt over the whole
    input (it equals the model's own embedding of the tokens when the offset
    is zero and ``m = 0``)::

        emb = params["embed_tokens"]["embedding"][tokens]
        h0 = adapters.dept_embeddings(p_dept, emb)
        logits = models.apply(graphdef, params, tokens[:, :0], prompt_embeddings=h0,
                              keep_prompt_logits=True)[:, m:]

    Every position of ``h_0`` is attended (train on unpadded or right-padded
    blocks, as with prompt tuning).

    Args:
      params: from ``dept``.
      token_embeddings: ``(B, T, d)`` or ``(T, d)`` with ``T <= s``.
      alpha: the authors' ``lora_alpha`` (scale ``alpha / sqrt(r)``).

    Returns:
      ``(B, m + T, d)`` (or ``(m + T, d)``) in ``token_embeddings``' dtype.

    Raises:
      ValueError: ``T > s`` or a width other than ``d``, naming the shapes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = dept(jax.random.key(0), 2, jnp.ones((10, 4)), rank=2, max_length=5)
      >>> p = p._replace(b=jnp.ones((2, 4)))
      >>> h = dept_embeddings(p, jnp.zeros((3, 4)), alpha=2 ** 0.5)
      >>> h.shape, bool(jnp.allclose(h[2:], (p.a[:3] @ p.b)))
      ((5, 4), True)
    """
    if not isinstance(params, DePTParams):
        raise TypeError(f"dept_embeddings: params must be DePTParams (from dept), got "
                        f"{type(params).__name__}")
    x = token_embeddings
    s, r = params.a.shape
    d = params.b.shape[1]
    if x.ndim not in (2, 3) or x.shape[-2] > s or x.shape[-1] != d:
        raise ValueError(f"dept_embeddings: token_embeddings must be (B, T, {d}) or "
                         f"(T, {d}) with T <= max_length {s}, got shape {x.shape} "
                         f"dtype {x.dtype}")
    t = x.shape[-2]
    scale = float(alpha) / math.sqrt(r)
    offset = scale * (params.a[:t].astype(jnp.float32) @ params.b.astype(jnp.float32))
    if x.ndim == 3:
        offset = offset[None]
    h = (x.astype(jnp.float32) + offset).astype(x.dtype)
    prompt = params.prompt.astype(x.dtype)
    if x.ndim == 3:
        prompt = jnp.broadcast_to(prompt[None], (x.shape[0],) + prompt.shape)
    return jnp.concatenate([prompt, h], axis=-2)


def dept_labels(*, prompt: str = "prompt", low_rank: str = "low_rank") -> DePTParams:
    """Labels of ``DePTParams`` for ``optax.partition`` (DePT's two learning rates).

    Args:
      prompt: the label of ``P_s``.
      low_rank: the label of ``A`` and ``B``.

    Returns:
      ``DePTParams`` of strings, the label tree of a ``DePTParams``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> p = DePTParams(prompt=jnp.zeros((2, 4)), a=jnp.zeros((5, 2)), b=jnp.zeros((2, 4)))
      >>> opt = optax.partition({"prompt": optax.sgd(3e-1), "low_rank": optax.sgd(5e-3)},
      ...                       dept_labels())
      >>> u, _ = opt.update(jax.tree.map(jnp.ones_like, p), opt.init(p), p)
      >>> round(float(u.prompt[0, 0]), 3), round(float(u.a[0, 0]), 3)
      (-0.3, -0.005)
    """
    return DePTParams(prompt=prompt, a=low_rank, b=low_rank)
