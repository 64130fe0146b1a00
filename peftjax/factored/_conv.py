# SPDX-License-Identifier: Apache-2.0
"""Factored convolutions: ``conv(x, W') = conv(x, W) + s·conv1x1(conv(x, A), B)``.

When an adapted kernel whose adapter's delta is a ``LowRankDelta`` (e.g.
``peftjax.adapters.lora_conv``) reaches a ``conv_general_dilated`` as its
kernel operand, ``conv`` computes the model's own convolution with the frozen
base kernel plus the adapter branch: ``A`` reshaped to the kernel's layout
with ``r`` output features, convolved with the base's strides, padding,
dilations and feature groups, then a 1x1 convolution with ``s·B`` written as
a contraction over the feature axis (a 1x1 conv is exactly that). Neither
``reshape(A@B)`` nor a kernel-sized cotangent is formed.

With ``feature_group_count = g > 1`` the kernel is ``(k..., in/g, out)`` and
the delta ``reshape(A@B)`` is a grouped kernel too: the branch convolves with
``A`` repeated for each group (``g·r`` features, ``g`` groups) and contracts
each group's ``r`` features with the matching ``out/g`` columns of ``B``.

Exports: ``conv``.
"""

from typing import Any

import jax
import jax.numpy as jnp

from peftjax import adapters
from peftjax.factored import _sym


def conv(sym: _sym.Sym, x: Any, params: dict, bind: Any, key: Any) -> Any | None:
    """Factored ``conv_general_dilated(x, view(W'))``; None if not of that form.

    Args:
      sym: the adapted kernel (the conv's ``rhs``).
      x: the conv's input (``lhs``), an ordinary array.
      params: the equation's parameters.
      bind: ``(lhs, rhs) -> out``, the model's own convolution.
      key: this site's dropout key, or None.

    Returns:
      The convolution's output, or None when the kernel's roles, the adapter or
      the convolution do not fit the factored form.
    """
    meta, roles = sym.meta, sym.meta.roles
    adapter, dims = meta.adapter, meta.dims
    if adapter is None or adapter.factored is None or sym.is_quant:
        return None
    if params["batch_group_count"] != 1 or meta.state_batch or len(dims.output) != 1:
        return None
    dn = params["dimension_numbers"]
    o_ax, *red_axes = dn.rhs_spec
    nred = len(dims.reduction)
    if roles[o_ax] != ("o", (0,)) or any(
            roles[a][0] != "i" or len(roles[a][1]) != 1 for a in red_axes):
        return None
    if sorted(roles[a][1][0] for a in red_axes) != list(range(nred)):
        return None
    trainable, frozen, _ = sym.parts
    w_m, _, _ = _sym._to_matrix(sym)  # unused by low-rank deltas (DCE)
    terms = adapter.factored.terms(w_m, trainable, frozen)
    lr = terms.delta
    if (not isinstance(lr, adapters.LowRankDelta) or terms.in_scale is not None
            or terms.out_scale is not None or terms.in_map is not None
            or terms.out_map is not None):
        return None

    y = bind(x, sym.base)
    ct = adapters.compute_dtype(x.dtype, lr.a.dtype)
    a = lr.a.astype(ct)
    if lr.core is not None:
        a = a @ lr.core.astype(ct)
    r = a.shape[-1]
    # A (in..., r) as a kernel in the base's layout, r output features.
    a = a.reshape(tuple(dims.shape[dims.reduction[k]] for k in range(nred)) + (r,))
    ndim = len(roles)
    a = jnp.transpose(a, [nred if p == o_ax else roles[p][1][0] for p in range(ndim)])
    g = params["feature_group_count"]
    if g > 1:
        a = jnp.concatenate([a] * g, axis=o_ax)
    if key is not None:
        x = _sym._dropout(x, adapter.dropout, key)
    z = jax.lax.conv_general_dilated(
        x.astype(ct), a, window_strides=params["window_strides"],
        padding=params["padding"], lhs_dilation=params["lhs_dilation"],
        rhs_dilation=params["rhs_dilation"], dimension_numbers=dn,
        feature_group_count=g, precision=params["precision"])
    c = dn.out_spec[1]
    z = jnp.moveaxis(z, c, -1)
    b = lr.b.astype(ct) * jnp.asarray(lr.scale, ct)
    n_out = b.shape[-1]
    if g == 1:
        d = z @ b
    else:
        z = z.reshape(z.shape[:-1] + (g, r))
        d = jnp.einsum("...gr,rgo->...go", z, b.reshape(r, g, n_out // g))
        d = d.reshape(d.shape[:-2] + (n_out,))
    d = jnp.moveaxis(d, -1, c)
    out_ct = adapters.compute_dtype(y.dtype, d.dtype)
    return (y.astype(out_ct) + d.astype(out_ct)).astype(y.dtype)
