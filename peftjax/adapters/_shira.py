# SPDX-License-Identifier: Apache-2.0
"""SHiRA: sparse high-rank adapters, trainable values at a fixed sparse mask of W.

Sparse High Rank Adapters. Bhardwaj et al., 2024.
https://arxiv.org/abs/2406.13175

SHiRA trains a small set of the weight's own entries: with a frozen binary
mask ``M`` (shape of ``W``) the update is ``ΔW = M ⊙ S`` for trainable
``S``; only the ``k`` entries where ``M = 1`` are stored (the paper's
Eq. 1, ``W' = W + M ⊙ S``). Hugging Face PEFT (``tuners/shira``), which this
module follows for its files, sizes the mask like a rank-``r`` LoRA,
``k = r·(in + out)`` (an error when that exceeds ``in·out``), builds its
default ``random`` mask as the first ``k`` entries of
``torch.randperm(out·in, generator)`` over the torch weight ``(out, in)``
(the generator seeded with ``random_seed``, or torch's default seed
``67280421310721`` when it is None, so every matrix of one shape gets the
same mask), stores the mask as ``shira_indices (2, k)`` int32 rows
``[output unit, input feature]`` in row-major order, and the trainable
``shira_weight (k,)`` zero at init (the identity). peftjax reproduces the
permutation without torch (torch's CPU ``randperm`` is a Fisher–Yates
shuffle driven by MT19937, which NumPy's legacy ``RandomState`` reproduces
bit for bit; only the first ``k`` swaps are run), and reads any other mask
(PEFT's custom ``mask_fn``) from the file's indices.

On a Flax kernel ``W (in, out)`` the entry ``(row, col)`` of the torch
weight is ``W[col, row]``.

Equation map: Eq. 1 ``W + M ⊙ S`` ↔ ``apply`` (a scatter-add; ``unapply``
subtracts it exactly); the mask ↔ ``shira_indices``.

Exports: ``SHiRAParams``, ``SHiRAIndices``, ``shira``, ``shira_indices``.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol

# torch's default CPU generator seed (c10::detail::default_rng_seed_val): the
# seed of a fresh ``torch.Generator()``, which PEFT's random_mask uses when
# random_seed is None.
TORCH_DEFAULT_SEED = 67280421310721


class SHiRAParams(NamedTuple):
    """Trainable values of the sparse update.

    Attributes:
      values: ``(k,)`` the update at ``indices`` (PEFT's ``shira_weight``).
    """

    values: jax.Array


class SHiRAIndices(NamedTuple):
    """Frozen sparse mask (PEFT's ``shira_indices``).

    Attributes:
      indices: ``(2, k)`` int32: row (output unit) and column (input feature)
        of each value in the torch-layout weight ``(out, in)``.
    """

    indices: jax.Array


def shira_num(n_out: int, n_in: int, r: int) -> int:
    """``k = r·(in + out)``, checked against ``in·out`` as PEFT does."""
    k = r * (n_in + n_out)
    if k > n_in * n_out:
        raise ValueError(
            f"shira: r={r} gives r*(in+out)={k} values, more than the "
            f"{n_in * n_out} entries of a matrix (in={n_in}, out={n_out}); "
            "lower r or exclude this matrix")
    return k


def shira_indices(n_out: int, n_in: int, r: int,
                  seed: int | None = None) -> np.ndarray:
    """PEFT's random SHiRA mask as indices: ``torch.randperm`` reproduced in NumPy.

    Args:
      n_out: output features (rows of the torch weight).
      n_in: input features (columns).
      r: PEFT's ``r``; the mask has ``r·(in + out)`` entries.
      seed: PEFT's ``random_seed`` (torch keeps its low 32 bits); None is a
        fresh ``torch.Generator()``, i.e. torch's default seed.

    Returns:
      ``(2, k)`` int32 ``[rows, columns]`` in row-major order.

    Example:
      >>> shira_indices(4, 6, 1, seed=0).shape
      (2, 10)
    """
    s = TORCH_DEFAULT_SEED if seed is None else int(seed)
    return _indices(int(n_out), int(n_in), int(r), s & 0xFFFFFFFF).copy()


@functools.lru_cache(maxsize=64)
def _indices(n_out: int, n_in: int, r: int, seed: int) -> np.ndarray:
    total = n_out * n_in
    k = shira_num(n_out, n_in, r)
    steps = min(k, total - 1)  # Fisher–Yates: entry i is final after swap i
    rs = np.random.RandomState(seed)
    raw = rs.randint(0, 2**32, size=steps, dtype=np.uint32).astype(np.int64)
    z = np.arange(steps) + raw % (total - np.arange(steps))
    moved: dict[int, int] = {}
    flat = np.empty(k, np.int64)
    for i in range(steps):
        zi = int(z[i])
        here = moved.get(i, i)
        flat[i] = moved.get(zi, zi)
        moved[zi] = here
    if k > steps:
        flat[steps:] = moved.get(steps, steps)
    flat.sort()  # PEFT takes torch.where(mask == 1): row-major order
    return np.stack([flat // n_in, flat % n_in]).astype(np.int32)


def shira(
    r: int = 32,
    *,
    random_seed: int | None = None,
    init_weights: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """SHiRA: ``W' = W + M ⊙ S`` with ``k = r·(in + out)`` trainable entries.

    The mask is PEFT's default random mask for ``random_seed`` (the same for
    every matrix of one shape); trainable parameters per matrix:
    ``r·(in + out)``, the count of a rank-``r`` LoRA (PEFT's). The update
    has no rank limit.

    The factored path (``peftjax.factored``) never forms ``ΔW``:
    ``y[..., row] += x[..., col] · value`` for the ``k`` stored entries, a
    gather and a segment-sum (scatter-add) of ``k`` products per row, cheaper
    than ``x (W + ΔW)``'s extra weight-sized term while ``k < in·out``. It is
    jit- and vmap-safe (the indices are frozen arrays, duplicates add).

    Args:
      r: sizes the mask, ``k = r·(in + out)`` (PEFT's default 32).
      random_seed: seed of the mask (PEFT's default None: torch's default
        generator seed).
      init_weights: True (PEFT's default): values start at zero, the
        identity; False: ``N(0, 1)`` (PEFT's test-only init, drawn here from
        the leaf's key).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of the values.

    Returns:
      An ``Adapter`` with trainable ``SHiRAParams(values)`` and frozen
      ``SHiRAIndices(indices)``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = shira(1, random_seed=0)
      >>> t, f = ad.init(jax.random.key(0), jnp.zeros((6, 4)))
      >>> t.values.shape, f.indices.shape
      ((10,), (2, 10))

    References:
      Bhardwaj et al., 2024, https://arxiv.org/abs/2406.13175
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"shira: r must be a positive int, got {r!r}")
    if random_seed is not None and (isinstance(random_seed, bool)
                                    or not isinstance(random_seed, int)):
        raise TypeError(f"shira: random_seed must be an int or None, got {random_seed!r}")
    if not isinstance(init_weights, bool):
        raise TypeError(f"shira: init_weights must be a bool, got {init_weights!r}")
    param_dtype = jnp.dtype(param_dtype)
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise TypeError(f"shira: param_dtype must be floating, got {param_dtype}")

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("shira takes no stats")
        n_in, n_out = w.shape
        idx = shira_indices(n_out, n_in, r, random_seed)
        k = idx.shape[1]
        if init_weights:
            vals = jnp.zeros((k,), param_dtype)
        else:
            vals = jax.random.normal(key, (k,), jnp.float32).astype(param_dtype)
        return SHiRAParams(vals), SHiRAIndices(jnp.asarray(idx))

    def scatter(w, t, f, sign):
        ct = _lowrank.compute_dtype(w.dtype, t.values.dtype)
        vals = t.values.astype(ct)
        return w.astype(ct).at[f.indices[1], f.indices[0]].add(
            vals if sign > 0 else -vals)

    def apply_matrix(w, t, f):
        return scatter(w, t, f, 1)

    def unapply_matrix(w, t, f, aux):
        return scatter(w, t, f, -1)

    def factored_matrix(w, t, f):
        n_out = w.shape[1]
        rows, cols = f.indices[0], f.indices[1]

        def delta(x):
            # y[..., row] += x[..., col] · value: k products, one segment-sum.
            ct = _lowrank.compute_dtype(x.dtype, t.values.dtype)
            vals = t.values.astype(ct).reshape((1,) * (x.ndim - 1) + (-1,))
            contrib = x[..., cols].astype(ct) * vals
            return jnp.zeros(x.shape[:-1] + (n_out,), ct).at[..., rows].add(contrib)

        return _protocol.FactoredTerms(delta=delta)

    seed_label = "None" if random_seed is None else str(int(random_seed))
    return _lift.lift_matrix(
        name=f"shira(r={r}, random_seed={seed_label})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("r", r), ("random_seed", random_seed),
                         ("init_weights", init_weights)),
    )
