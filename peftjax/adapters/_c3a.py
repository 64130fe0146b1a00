# SPDX-License-Identifier: Apache-2.0
"""C3A: a block-circulant weight update applied as circular convolutions.

Parameter-Efficient Fine-Tuning via Circular Convolution. Chen et al., 2024
(ACL Findings 2025). https://arxiv.org/abs/2407.19342

The update is a block matrix of circulant blocks (§3 of the paper): with block
size ``b`` dividing both ``in`` and ``out``, a trainable kernel ``K (out/b,
in/b, b)`` holds one length-``b`` vector per block, and the torch-layout update
``ΔW (out, in)`` has block ``(m, n)`` equal to the circulant matrix of
``K[m, n]``. Applying it to an activation is a sum of circular convolutions,
done with FFTs in ``O(in·log b + (in·out/b))`` per row instead of
``O(in·out)``, and the update has full rank in general (§3.2) for ``in·out/b``
parameters.

Hugging Face PEFT (``tuners/c3a``), which this module follows, fixes the
orientation and the scale: the output block ``m`` is
``y_m[t] = Σ_n Σ_j K[m, n, (j - t) mod b] · x_n[j] / in`` (its
``fft(ifft(x) · fft(K))`` is a circular cross-correlation), i.e.
``ΔW[m·b + t, n·b + j] = K[m, n, (j - t) mod b] / in``: the paper's ``1/in``
normalisation is PEFT's ``/ x.size(-1)``. Initialisation follows PEFT's
``init_weights``: ``"xavier_uniform"`` (PEFT's default, and what ``False``
means) draws ``U(±sqrt(6 / (in + out)))``, so C3A is *not* the identity at
init by default; ``True`` gives zeros (the identity); ``"gaussian"`` draws
``N(0, 1)``; ``"kaiming_uniform"`` draws ``U(±sqrt(1 / in))``. PEFT keeps the
kernel in float32 whatever the base dtype; ``param_dtype`` defaults to that.

On a Flax kernel ``W (in, out)`` the update is ``ΔWᵀ``:
``ΔWᵀ[n·b + j, m·b + t] = K[m, n, (j - t) mod b] / in``. The weight-space path
forms it by gathering ``K`` (exact, no FFT); the factored path never forms it.

Exports: ``C3AParams``, ``c3a``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol

_INITS = ("xavier_uniform", "kaiming_uniform", "gaussian")


class C3AParams(NamedTuple):
    """Trainable circular-convolution kernels.

    Attributes:
      kernel: ``(out/b, in/b, b)``: PEFT's ``c3a_kernel`` (same layout, no
        transpose), one length-``b`` kernel per ``(output block, input block)``.
    """

    kernel: jax.Array


def _check_block(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) \
            or block_size < 1:
        raise ValueError(f"c3a: block_size must be a positive int, got {block_size!r}")
    return int(block_size)


def _check_init(init_weights: Any) -> Any:
    if init_weights is True or init_weights is False or init_weights in _INITS:
        return init_weights
    raise ValueError(f"c3a: init_weights must be True, False or one of {_INITS}, "
                     f"got {init_weights!r}")


def c3a(
    block_size: int = 256,
    *,
    init_weights: bool | str = "xavier_uniform",
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """C3A: ``W' = W + ΔWᵀ`` with ``ΔW`` block-circulant (PEFT's ``C3A``).

    Trainable parameters per matrix: ``(out / b) · (in / b) · b = in·out / b``.
    ``b`` must divide both ``in`` and ``out`` (PEFT's rule; PEFT suggests the
    greatest common divisor of the adapted matrices' sizes).

    The factored path does not form ``ΔW``: the input row is cut into
    ``in/b`` blocks, ``X = rfft(x_n)``, ``Y_m = Σ_n X_n · conj(rfft(K[m, n]))``
    and ``y_m = irfft(Y_m) / in``: ``O(in·log b + in·out/b)`` per row (PEFT's
    own forward, with real FFTs), no weight-sized temporary or cotangent. The
    weight-space path gathers ``K`` into the circulant blocks (no FFT).

    Args:
      block_size: ``b`` (PEFT's default 256).
      init_weights: PEFT's ``init_weights``: ``"xavier_uniform"`` (default)
        or False, ``"kaiming_uniform"``, ``"gaussian"``, or True (zeros: the
        identity at init).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of ``K`` (PEFT: float32).

    Returns:
      An ``Adapter`` with trainable ``C3AParams`` and no frozen state.

    Raises:
      ValueError: at init, when ``b`` does not divide ``in`` or ``out``
        (naming the shape).

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = c3a(2, init_weights=True)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((4, 6)))
      >>> t.kernel.shape, f
      ((3, 2, 2), None)

    References:
      Chen et al., 2024, https://arxiv.org/abs/2407.19342
    """
    b = _check_block(block_size)
    init_weights = _check_init(init_weights)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("c3a takes no stats")
        n_in, n_out = w.shape
        if n_in % b or n_out % b:
            raise ValueError(f"c3a: block_size={b} must divide both in and out of the "
                             f"matrix (in={n_in}, out={n_out}) of a kernel of shape "
                             f"{tuple(w.shape)} {w.dtype}")
        shape = (n_out // b, n_in // b, b)
        if init_weights is True:
            k = jnp.zeros(shape, jnp.float32)
        elif init_weights == "gaussian":
            k = jax.random.normal(key, shape, jnp.float32)
        else:
            if init_weights == "kaiming_uniform":
                bound = math.sqrt(1.0 / n_in)
            else:  # "xavier_uniform" or False, as PEFT
                bound = math.sqrt(3.0) * math.sqrt(2.0 / (n_in + n_out))
            k = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        return C3AParams(k.astype(param_dtype)), None

    def delta(w, t):
        """``ΔWᵀ (in, out)`` in float32 (or wider), by gathering ``K``."""
        n_in, n_out = w.shape
        k = t.kernel.astype(_lowrank.compute_dtype(jnp.float32, t.kernel.dtype))
        m, n = n_out // b, n_in // b
        j = np.arange(b)
        shift = (j[:, None] - j[None, :]) % b  # [j, t] -> (j - t) mod b
        blocks = k[:, :, shift]  # (m, n, b_j, b_t)
        return jnp.transpose(blocks, (1, 2, 0, 3)).reshape(n * b, m * b) / n_in

    def apply_matrix(w, t, f):
        d = delta(w, t)
        return w.astype(_lowrank.compute_dtype(w.dtype, d.dtype)) + d

    def unapply_matrix(w, t, f, aux):
        d = delta(w, t)
        return w.astype(_lowrank.compute_dtype(w.dtype, d.dtype)) - d

    def factored_matrix(w, t, f):
        n_in, n_out = w.shape
        k = t.kernel.astype(_lowrank.compute_dtype(jnp.float32, t.kernel.dtype))
        kf = jnp.conj(jnp.fft.rfft(k, axis=-1))  # (m, n, b//2 + 1)

        def run(x):
            xb = x.astype(k.dtype).reshape(x.shape[:-1] + (n_in // b, b))
            yf = jnp.einsum("...nf,mnf->...mf", jnp.fft.rfft(xb, axis=-1), kf)
            y = jnp.fft.irfft(yf, n=b, axis=-1)
            return y.reshape(x.shape[:-1] + (n_out,)) / n_in

        return _protocol.FactoredTerms(delta=run)

    return _lift.lift_matrix(
        name=f"c3a(block_size={b}, init_weights={init_weights!r})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("block_size", b), ("init_weights", init_weights)),
    )
