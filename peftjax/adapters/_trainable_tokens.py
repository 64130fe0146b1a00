# SPDX-License-Identifier: Apache-2.0
"""Trainable tokens: train a few rows (token ids) of an embedding table.

Hugging Face PEFT's ``tuners/trainable_tokens`` (``TrainableTokensConfig``,
PEFT 0.15+); there is no paper. PEFT keeps, per adapted table, a trainable
``trainable_tokens_delta`` of shape ``(k, d)`` that despite its name holds
the *values* of the ``k`` selected rows, not a difference: the forward pass
uses ``W.index_copy(0, token_indices, delta)``, i.e.
``W'[token_indices[j]] = delta[j]`` and every other row of ``W`` unchanged.
With the default ``init_weights=True`` the values start as copies of the
rows (the identity at init); ``init_weights=False`` draws them ``N(0, 1)``.
Merging writes the values in; unmerging writes back the original rows,
which PEFT keeps in a buffer (``trainable_tokens_original``) and ``fold``
here returns as its ``aux``, so ``unfold`` is exact in every dtype.

The rows are those of the leaf's matrix view's input axis: an embedding
table ``(vocab, d)`` as it is (Flax ``nnx.Embed``/``nn.Embed`` and the
default ``(in, out)`` view agree). An untied output head kernel
``(d, vocab)`` needs ``dimension_numbers=tree.DimensionNumbers(
reduction_axis=-1, output_axis=-2)`` so that its vocabulary axis is the
"input" one. A head *tied* to the table (SmolLM2's ``tie_word_embeddings``,
peftjax's Llama with one shared table) is the same leaf, so it sees the same
trained rows: what PEFT does by tying a second ``TrainableTokensLayer`` on
``lm_head`` to the embedding's.

Equations (PEFT's ``TrainableTokensLayer``): ``get_merged_weights`` ↔
``apply``; ``unmerge`` ↔ ``unapply``; ``update_layer`` ↔ ``init``.

There is no factored form, and none is needed: ``W'`` is ``W`` with ``k``
rows replaced (one scatter of ``k·d`` values), and a lookup into it is a
gather. Under ``peftjax.factored`` the table is materialised (with its one
"no factored form" warning); the gradient of the values is the table
cotangent's ``k`` rows.

Exports: ``TrainableTokensParams``, ``trainable_tokens``.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _protocol


class TrainableTokensParams(NamedTuple):
    """The trained rows of one table (PEFT's ``trainable_tokens_delta``).

    Attributes:
      values: ``(k, out)``: row ``j`` replaces row ``token_indices[j]`` of
        the ``(in, out)`` matrix view (``(k, d)`` for a ``(vocab, d)`` table).
    """

    values: jax.Array


def _check_indices(token_indices: Any) -> tuple[int, ...]:
    if isinstance(token_indices, np.ndarray) and token_indices.ndim == 1:
        token_indices = token_indices.tolist()  # a tokenizer's ids, say
    if isinstance(token_indices, (str, bytes)) or not isinstance(token_indices, Sequence):
        raise TypeError("trainable_tokens: token_indices must be a sequence of ints, "
                        f"got {type(token_indices).__name__} {token_indices!r}")
    out = []
    for i in token_indices:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError("trainable_tokens: token_indices must hold ints, got "
                            f"{i!r} ({type(i).__name__})")
        if i < 0:
            raise ValueError(f"trainable_tokens: token_indices must be >= 0, got {int(i)}")
        out.append(int(i))
    if not out:
        raise ValueError("trainable_tokens: token_indices is empty (PEFT's default []"
                         " trains nothing); name the token ids to train")
    seen: set[int] = set()
    dup = sorted({i for i in out if i in seen or seen.add(i)})
    if dup:
        # index_copy with a repeated index is undefined in torch (the last copy
        # may or may not win), so such a file is ambiguous.
        raise ValueError(f"trainable_tokens: token_indices repeats {dup}; each "
                         "token id may appear once")
    return tuple(out)


def trainable_tokens(
    token_indices: Sequence[int],
    *,
    init_weights: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """Trainable tokens: ``W'[token_indices] = V``, every other row of ``W`` frozen.

    Trainable parameters per table: ``k · d`` for ``k = len(token_indices)``
    rows of width ``d`` (PEFT counts the same; a tied head adds nothing).

    Args:
      token_indices: the rows (token ids) to train, in the order of the rows
        of ``values`` (PEFT's ``token_indices``): a sequence (or 1-D NumPy
        array) of distinct ints, each below the matrix view's input size (the
        vocabulary).
      init_weights: True (PEFT's default): ``V`` starts as a copy of the rows,
        the identity at init; False: ``V ~ N(0, 1)`` (PEFT's ``torch.randn``
        in distribution, not in bits).
      dimension_numbers: the leaf's matrix view; the rows are its input axis
        (default: a ``(vocab, d)`` table; stacked tables are lifted per slice).
      param_dtype: storage dtype of ``V``.

    Returns:
      An ``Adapter`` with trainable ``TrainableTokensParams`` and no frozen
      part (the indices are static, in ``adapter.hyperparameters``). No
      factored form (a row scatter; see the module doc).

    Raises:
      TypeError / ValueError: ``token_indices`` empty, repeated, negative or
        not ints (here); an index at or above the table's row count (at
        ``init``, naming the shape).

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = trainable_tokens([2, 0])
      >>> w = jnp.arange(8.0).reshape(4, 2)
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.values
      Array([[4., 5.],
             [0., 1.]], dtype=float32)
      >>> ad.apply(w, t._replace(values=-t.values), f)[:3]
      Array([[-0., -1.],
             [ 2.,  3.],
             [-4., -5.]], dtype=float32)
    """
    idx = _check_indices(token_indices)
    if not isinstance(init_weights, (bool, np.bool_)):
        raise TypeError(f"trainable_tokens: init_weights must be a bool, got {init_weights!r}")
    init_weights = bool(init_weights)
    param_dtype = jnp.dtype(param_dtype)
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise TypeError(f"trainable_tokens: param_dtype must be floating, got {param_dtype}")
    k, top = len(idx), max(idx)

    def rows() -> jax.Array:
        return jnp.asarray(idx, jnp.int32)

    def check(w, t=None):
        n_in, n_out = w.shape
        if top >= n_in:
            raise ValueError(f"trainable_tokens: token index {top} is out of range for "
                             f"a table of {n_in} rows (matrix view {tuple(w.shape)}, "
                             f"dtype {w.dtype}); token_indices={list(idx)}")
        if t is not None and t.values.shape != (k, n_out):
            raise ValueError(f"trainable_tokens: values have shape {t.values.shape}, "
                             f"expected {(k, n_out)} for {k} token(s) of a "
                             f"{tuple(w.shape)} table")

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("trainable_tokens takes no stats")
        check(w)
        if init_weights:
            values = w[rows()].astype(param_dtype)
        else:
            values = jax.random.normal(key, (k, w.shape[1]), jnp.float32).astype(param_dtype)
        return TrainableTokensParams(values), None

    def apply_matrix(w, t, f):
        check(w, t)
        return w.at[rows()].set(t.values.astype(w.dtype), unique_indices=True)

    def aux_matrix(w, t, f):
        check(w, t)
        return w[rows()]  # PEFT's trainable_tokens_original

    def unapply_matrix(w, t, f, aux):
        if aux is None:
            raise ValueError("trainable_tokens: unfold needs the aux returned by "
                             "fold(..., return_aux=True) (the original rows)")
        check(w, t)
        return w.at[rows()].set(aux.astype(w.dtype), unique_indices=True)

    shown = list(idx) if k <= 8 else f"[{', '.join(map(str, idx[:8]))}, ... ({k})]"
    return _lift.lift_matrix(
        name=f"trainable_tokens(token_indices={shown}, init_weights={init_weights})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        aux_matrix=aux_matrix,
        dimension_numbers=dimension_numbers,
        hyperparameters=(("token_indices", idx), ("init_weights", init_weights)),
    )
