# SPDX-License-Identifier: Apache-2.0
"""Multitask prompt tuning (MPT): a shared prompt times per-task low-rank factors.

Multitask Prompt Tuning Enables Parameter-Efficient Transfer Learning. Wang,
Panda, Karlinsky, Feris, Sun & Kim, ICLR 2023. https://arxiv.org/abs/2303.02861

The paper decomposes task ``k``'s prompt into a shared prompt
``P* (P, d)`` and a rank-``r`` task matrix ``W_k = u_k ⊗ v_kᵀ``:
``P̂_k = P* ∘ W_k`` (``∘`` the Hadamard product). Hugging Face PEFT
(``tuners/multitask_prompt_tuning``, followed here, also for its files)
stores the shared prompt as ``prompt_embeddings (P, d)`` and the factors of
all ``T`` tasks as ``prefix_task_cols (T, P, r)`` and ``prefix_task_rows
(T, r, d)``, with ``W_k = cols_k @ rows_k`` (rank ``r = num_ranks``; the
paper uses rank 1). Inits as PEFT's: the shared prompt as in prompt tuning
(``N(0, 1)`` or text), both factors ``N(0, 0.02²)``; PEFT's transfer inits
from a source-trained MPT (``AVERAGE_SOURCE_TASKS``, ``EXACT_SOURCE_TASK``,
``ONLY_SOURCE_SHARED``) are ``multitask_prompt_tuning(source=...)``.

Each example carries its task id: ``multitask_prompt(params, task_ids)``
gives per-example prompts ``(B, P, d)`` that peftjax's models take as
``prompt_embeddings``. The task ids are ordinary int arrays, so a jitted
step sees them as data (one trace for every mix of tasks).

Exports: ``MultitaskPromptParams``, ``multitask_prompt_tuning``,
``multitask_prompt``.
"""

import functools
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax.adapters import _prompt


class MultitaskPromptParams(NamedTuple):
    """Trainable MPT parameters.

    Attributes:
      embeddings: shared prompt ``(P, d)`` (PEFT ``prompt_embeddings``).
      task_cols: ``(T, P, r)`` (PEFT ``prefix_task_cols``).
      task_rows: ``(T, r, d)`` (PEFT ``prefix_task_rows``).
    """

    embeddings: jax.Array
    task_cols: jax.Array
    task_rows: jax.Array


_SOURCE_INITS = ("average", "exact", "shared")


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"multitask_prompt_tuning: {name} must be a positive int, "
                         f"got {value!r}")
    return int(value)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _factors(key: jax.Array, t: int, p: int, r: int, d: int) -> tuple[jax.Array, jax.Array]:
    """PEFT's ``N(0, 0.02²)`` task factors ``(T, P, r)``, ``(T, r, d)``."""
    kc, kr = jax.random.split(key)
    return jax.random.normal(kc, (t, p, r)) * 0.02, jax.random.normal(kr, (t, r, d)) * 0.02


def multitask_prompt_tuning(
        key: jax.Array, num_tokens: int, embedding_table: jax.Array, *,
        num_tasks: int = 1, rank: int = 1,
        init: _prompt.PromptInit = _prompt.PromptInit.RANDOM,
        token_ids: Sequence[int] | None = None,
        source: MultitaskPromptParams | None = None, source_init: str = "average",
        source_task: int = 0, param_dtype: Any = jnp.float32) -> MultitaskPromptParams:
    """Creates MPT parameters (PEFT's ``MultitaskPromptTuningConfig`` inits).

    Trainable parameters: ``P·d + T·r·(P + d)``.

    Args:
      key: PRNG key.
      num_tokens: ``P`` (PEFT's ``num_virtual_tokens``).
      embedding_table: the model's ``(V, d)`` token embeddings (read only).
      num_tasks: ``T`` (PEFT's ``num_tasks``).
      rank: ``r`` (PEFT's ``num_ranks``).
      init: the shared prompt's ``PromptInit`` (``RANDOM`` or ``TEXT``; as
        ``prompt_tuning``).
      token_ids: for ``PromptInit.TEXT``.
      source: a source-trained ``MultitaskPromptParams`` (PEFT's
        ``prompt_tuning_init_state_dict_path``): with it the shared prompt is
        the source's, and ``source_init`` picks the factors:
        ``"average"`` (PEFT ``AVERAGE_SOURCE_TASKS``: the mean over source
        tasks, ``T = 1``), ``"exact"`` (``EXACT_SOURCE_TASK``: source task
        ``source_task``, ``T = 1``), ``"shared"`` (``ONLY_SOURCE_SHARED``:
        fresh factors).
      source_task: the source task for ``"exact"``.
      param_dtype: storage dtype.

    Returns:
      ``MultitaskPromptParams``.

    Raises:
      ValueError: non-positive sizes, an unknown ``source_init``, or a source
        whose shapes do not fit.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = multitask_prompt_tuning(jax.random.key(0), 4, jnp.ones((10, 6)),
      ...                             num_tasks=3, rank=2)
      >>> p.task_cols.shape, p.task_rows.shape
      ((3, 4, 2), (3, 2, 6))
    """
    p = _positive(num_tokens, "num_tokens")
    t = _positive(num_tasks, "num_tasks")
    r = _positive(rank, "rank")
    d = embedding_table.shape[1]
    ke, key = jax.random.split(key)
    if source is None:
        emb = _prompt.prompt_tuning(ke, p, embedding_table, init=init, token_ids=token_ids,
                                    param_dtype=param_dtype).embeddings
        cols, rows = _factors(key, t, p, r, d)
        return MultitaskPromptParams(emb, cols.astype(param_dtype), rows.astype(param_dtype))
    if source_init not in _SOURCE_INITS:
        raise ValueError(f"multitask_prompt_tuning: source_init must be one of "
                         f"{_SOURCE_INITS}, got {source_init!r}")
    if source.embeddings.shape != (p, d):
        raise ValueError(f"multitask_prompt_tuning: source embeddings have shape "
                         f"{source.embeddings.shape}; expected {(p, d)}")
    emb = source.embeddings.astype(param_dtype)
    if source_init == "shared":
        cols, rows = _factors(key, t, p, r, d)
    else:
        if source.task_cols.shape[1:] != (p, r) or source.task_rows.shape[1:] != (r, d):
            raise ValueError(
                f"multitask_prompt_tuning: source factors have shapes "
                f"{source.task_cols.shape}/{source.task_rows.shape}; expected "
                f"(T, {p}, {r})/(T, {r}, {d})")
        if t != 1:
            raise ValueError(f"multitask_prompt_tuning: source_init={source_init!r} "
                             f"makes one task (as PEFT), got num_tasks={t}")
        if source_init == "average":
            cols = source.task_cols.mean(0, keepdims=True)
            rows = source.task_rows.mean(0, keepdims=True)
        else:
            n = source.task_cols.shape[0]
            if not 0 <= source_task < n:
                raise ValueError(f"multitask_prompt_tuning: source_task={source_task} "
                                 f"outside the source's {n} tasks")
            cols = source.task_cols[source_task][None]
            rows = source.task_rows[source_task][None]
    return MultitaskPromptParams(emb, cols.astype(param_dtype), rows.astype(param_dtype))


def multitask_prompt(params: MultitaskPromptParams, task_ids: jax.Array) -> jax.Array:
    """Per-example prompts ``P* ∘ (cols_k @ rows_k)`` for task ids ``(B,)``.

    Args:
      params: from ``multitask_prompt_tuning``.
      task_ids: int ``(B,)``, each in ``[0, T)`` (ids outside are clamped by
        the gather, as any JAX index; validate them in the data pipeline).

    Returns:
      ``(B, P, d)``, the models' ``prompt_embeddings``.

    Raises:
      ValueError: ``task_ids`` not an int vector.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = MultitaskPromptParams(jnp.ones((2, 3)), jnp.ones((1, 2, 1)),
      ...                           jnp.full((1, 1, 3), 2.0))
      >>> multitask_prompt(p, jnp.array([0]))[0]
      Array([[2., 2., 2.],
             [2., 2., 2.]], dtype=float32)
    """
    task_ids = jnp.asarray(task_ids)
    if task_ids.ndim != 1 or not jnp.issubdtype(task_ids.dtype, jnp.integer):
        raise ValueError(f"multitask_prompt: task_ids must be an int vector (B,), got "
                         f"shape {task_ids.shape} dtype {task_ids.dtype}")
    task = jnp.einsum("bpr,brd->bpd", params.task_cols[task_ids], params.task_rows[task_ids])
    return params.embeddings[None] * task
