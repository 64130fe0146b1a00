# SPDX-License-Identifier: Apache-2.0
"""FourierFT: a few trainable spectral coefficients of the weight update.

Parameter-Efficient Fine-Tuning with Discrete Fourier Transform. Gao et al.,
2024. https://arxiv.org/abs/2405.03003

Section 3 of the paper: ``n`` frequency positions ``E`` are drawn at random
once and shared (frozen); the trainable coefficients ``c (n,)`` are scattered
into a dense spectrum ``F = ToDense(E, c)`` of the torch weight's shape
``(out, in)``, and ``ΔW = α · Re(IDFT2(F))``. Hugging Face PEFT
(``tuners/fourierft``), which this module follows for its files, draws the
positions as ``torch.randperm(out·in, generator=manual_seed(random_loc_seed))
[:n]`` (flat index ``k`` -> row ``k // in``, column ``k % in``), uses
``torch.fft.ifft2`` (normalised by ``1/(out·in)``), ``α = scaling`` (default
150) and, by default, ``c ~ N(0, 1)`` (``init_weights=False``: not the
identity at init; the paper does the same). peftjax reproduces the
permutation without torch: ``torch.randperm`` on the CPU is a Fisher–Yates
shuffle driven by MT19937 seeded with the 32-bit seed, which NumPy's legacy
``RandomState`` reproduces bit for bit.

On a Flax kernel ``W (in, out)`` the update is ``ΔWᵀ``.

Exports: ``FourierFTParams``, ``FourierFTIndices``, ``fourierft``,
``fourierft_indices``.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol


class FourierFTParams(NamedTuple):
    """Trainable spectral coefficients.

    Attributes:
      spectrum: ``(n,)`` coefficients ``c``.
    """

    spectrum: jax.Array


class FourierFTIndices(NamedTuple):
    """Frozen frequency positions (PEFT's ``indices``).

    Attributes:
      indices: ``(2, n)`` int32: row (output unit) and column (input feature)
        of each coefficient in the torch-layout spectrum ``(out, in)``.
    """

    indices: jax.Array


def fourierft_indices(n_out: int, n_in: int, n_frequency: int,
                      seed: int = 777) -> np.ndarray:
    """PEFT's frequency positions: ``torch.randperm`` reproduced in NumPy.

    Args:
      n_out: output features (rows of the torch weight).
      n_in: input features (columns).
      n_frequency: ``n``, at most ``n_out * n_in``.
      seed: PEFT's ``random_loc_seed`` (torch keeps its low 32 bits).

    Returns:
      ``(2, n)`` int32 ``[rows, columns]``.

    Example:
      >>> fourierft_indices(4, 3, 5, seed=0).shape
      (2, 5)
    """
    return _indices(int(n_out), int(n_in), int(n_frequency),
                    int(seed) & 0xFFFFFFFF).copy()


@functools.lru_cache(maxsize=64)
def _indices(n_out: int, n_in: int, n_frequency: int, seed: int) -> np.ndarray:
    total = n_out * n_in
    if not 0 < n_frequency <= total:
        raise ValueError(f"fourierft: n_frequency must be in [1, out*in={total}] "
                         f"for a matrix (in={n_in}, out={n_out}), got {n_frequency}")
    # torch's CPU randperm is a Fisher–Yates shuffle drawing one 32-bit value
    # per step; entry i is final after step i, so the first n steps (and
    # draws) give the first n positions.
    steps = min(n_frequency, total - 1)
    raw = np.random.RandomState(seed).randint(0, 2**32, size=max(steps, 0),
                                              dtype=np.uint32)
    perm = np.arange(total, dtype=np.int64)
    for i in range(steps):
        z = i + int(raw[i]) % (total - i)
        perm[i], perm[z] = perm[z], perm[i]
    flat = perm[:n_frequency]
    return np.stack([flat // n_in, flat % n_in]).astype(np.int32)


def fourierft(
    n_frequency: int = 1000,
    *,
    scaling: float = 150.0,
    random_loc_seed: int = 777,
    init_weights: bool = False,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """FourierFT: ``W' = W + α · Re(IDFT2(ToDense(E, c)))ᵀ``.

    Trainable parameters per matrix: ``n_frequency``. The positions ``E``
    are frozen and regenerated from ``random_loc_seed`` (the same for every
    matrix of one shape, as in PEFT).

    The factored path does not form ``ΔW``: with real bases
    ``C_in = cos(2π q l_k / in)``, ``S_in = sin(...)`` ``(in, n)`` and
    ``C_out = cos(2π j_k p / out)``, ``S_out`` ``(n, out)`` built from the
    frozen positions ``(j_k, l_k)``, ``x ΔWᵀ = α/(in·out) ·
    [((x C_in) ⊙ c) C_out − ((x S_in) ⊙ c) S_out]``: ``O(n·(in + out))`` per
    row, like a rank-``n`` LoRA (cheaper than ``W + ΔW`` while
    ``n < in·out / (in + out)``). The weight-space path uses ``jnp.fft.ifft2``.

    Args:
      n_frequency: ``n`` (PEFT's default 1000).
      scaling: ``α`` (PEFT's default 150.0).
      random_loc_seed: seed of the positions (PEFT's default 777).
      init_weights: True: ``c = 0`` (the identity at init); False (PEFT's
        and the paper's default): ``c ~ N(0, 1)``.
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of ``c``.

    Returns:
      An ``Adapter`` with trainable ``FourierFTParams`` and frozen
      ``FourierFTIndices``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = fourierft(4, scaling=1.0, init_weights=True)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((3, 5)))
      >>> t.spectrum.shape, f.indices.shape
      ((4,), (2, 4))

    References:
      Gao et al., 2024, https://arxiv.org/abs/2405.03003
    """
    if isinstance(n_frequency, bool) or not isinstance(n_frequency, int) or n_frequency < 1:
        raise ValueError(f"fourierft: n_frequency must be a positive int, got {n_frequency!r}")
    if not math.isfinite(scaling):
        raise ValueError(f"fourierft: scaling must be finite, got {scaling!r}")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("fourierft takes no stats")
        n_in, n_out = w.shape
        idx = fourierft_indices(n_out, n_in, n_frequency, random_loc_seed)
        if init_weights:
            c = jnp.zeros((n_frequency,), param_dtype)
        else:
            c = jax.random.normal(key, (n_frequency,), jnp.float32).astype(param_dtype)
        return FourierFTParams(c), FourierFTIndices(jnp.asarray(idx))

    def delta(w, t, f):
        """``ΔWᵀ (in, out)`` in float32 (or wider)."""
        n_in, n_out = w.shape
        c = t.spectrum.astype(_lowrank.compute_dtype(jnp.float32, t.spectrum.dtype))
        dense = jnp.zeros((n_out, n_in), c.dtype).at[
            f.indices[0], f.indices[1]].set(c)
        return (jnp.fft.ifft2(dense).real * scaling).T

    def apply_matrix(w, t, f):
        d = delta(w, t, f)
        return w.astype(_lowrank.compute_dtype(w.dtype, d.dtype)) + d

    def unapply_matrix(w, t, f, aux):
        d = delta(w, t, f)
        return w.astype(_lowrank.compute_dtype(w.dtype, d.dtype)) - d

    def factored_matrix(w, t, f):
        n_in, n_out = w.shape
        c = t.spectrum.astype(_lowrank.compute_dtype(jnp.float32, t.spectrum.dtype))
        rows = f.indices[0].astype(c.dtype)
        cols = f.indices[1].astype(c.dtype)
        th_in = (2 * jnp.pi / n_in) * jnp.arange(n_in, dtype=c.dtype)[:, None] * cols[None, :]
        th_out = (2 * jnp.pi / n_out) * rows[:, None] * jnp.arange(n_out, dtype=c.dtype)[None, :]
        s = scaling / (n_in * n_out)

        def run(x):
            xc = x.astype(c.dtype)
            cb = c.reshape((1,) * (x.ndim - 1) + c.shape)
            re = (xc @ jnp.cos(th_in)) * cb
            im = (xc @ jnp.sin(th_in)) * cb
            return s * (re @ jnp.cos(th_out) - im @ jnp.sin(th_out))

        return _protocol.FactoredTerms(delta=run)

    return _lift.lift_matrix(
        name=(f"fourierft(n_frequency={n_frequency}, scaling={float(scaling)!r}, "
              f"seed={int(random_loc_seed)})"),
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("n_frequency", n_frequency), ("scaling", float(scaling)),
                         ("random_loc_seed", int(random_loc_seed))),
    )
