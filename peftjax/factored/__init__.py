# SPDX-License-Identifier: Apache-2.0
"""Factored execution: train adapters without forming ``W + ΔW``.

``materialize`` feeds a model ``W' = W + s·A@B``: backpropagation then forms a
weight-sized cotangent and the full ``x^T·dy`` matmul for every adapted
matrix. ``transform(apply_fn, assignment, trainable, frozen)`` returns a
function with ``apply_fn``'s signature and results that computes
``x@W + s·dropout(x)@A@B`` instead (DoRA: ``(x@W + s·x@A@B) ⊙ m/‖W + sAB‖``
with the column norms from ``‖W_j‖² + 2s(AᵀW)_j·B_j + s²B_jᵀ(AᵀA)B_j``;
LoRA-XS: ``x@W + s·((x@A)@R)@B``; scale-shift: ``((x ⊙ l_in)@W) ⊙ l_out``).

Mechanism, chosen by measurement (see ``benchmarks/lora_step.py``): a
jaxpr-level transform of the apply function. ``apply_fn`` is traced with the
base params; the jaxpr is re-evaluated inside the caller's trace with every
adapted kernel as a symbolic value that carries its adapter state. Because it
works on the jaxpr it needs nothing from the model: peftjax's NNX models
(scan over stacked layers, remat), unmodified Linen models (``Dense``,
``DenseGeneral``, ``Einsum``) and unmodified NNX models (``nnx.Linear``,
``LinearGeneral``, ``Einsum``) take the same path; Linen's
``intercept_methods`` would cover Linen only, and adapted-leaf pytrees would
need model cooperation. On SmolLM2-135M (batch 4x128, LoRA r=8 on q,k,v,o) the
factored step has about 0.67x the FLOPs of full fine-tuning (materialize:
about 0.73x) and no temporary of an adapted kernel's shape.

What is handled: ``dot_general`` (``@``, ``jnp.dot``, ``jnp.einsum``,
``lax.dot_general``) whose kernel operand reaches it through
``convert_element_type``, ``transpose``, ``reshape`` (merging or splitting
input/output axes), ``squeeze``/unit ``broadcast_in_dim``, and
``slice``/``dynamic_slice``/``scan`` slicing along a stacked-layer axis; inside
``jit``/``pjit`` (inlined), ``scan``, ``remat``/``checkpoint``, ``cond``/
``switch``, ``while`` bodies and ``custom_jvp``/``custom_vjp`` functions.
``conv_general_dilated`` (Linen ``nn.Conv``/``nn.ConvTranspose``, NNX
``nnx.Conv``, 1-D to 3-D, any strides, padding, dilations and feature groups)
with an
``adapters.lora_conv`` kernel runs as ``conv(x, W) + s·conv1x1(conv(x, A), B)``.

Limits:

* A ``custom_jvp``/``custom_vjp`` function that receives an adapted kernel is
  inlined: its primal body is differentiated by ordinary autodiff instead of
  its custom rule (the rule's cotangent for the kernel would be weight-sized).
  Calls that receive no adapted kernel keep their rules.
* Any other use of an adapted kernel (``jnp.linalg.norm(kernel)``, a kernel
  in a ``scan`` carry, a ``dot_general`` batched over the kernel's layer axis
  as ``vmap`` over layers produces, a product of two adapted kernels, an
  adapter without a factored form) is materialised for that use only, with
  exactly one ``FactoredFallbackWarning`` naming the path per call; results
  are still exact. Adapter dropout cannot be applied to such a use.
* The parameter tree must be an argument of ``apply_fn`` (``argnum``); kernels
  closed over by ``apply_fn`` are invisible to the transform.
* Bias reparametrisations (SSF's shift, (IA)³ on the output) are applied to
  the bias vectors directly, which is cheap.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from peftjax import adapters, factored, tree
  >>> params = {"w": jnp.ones((4, 3))}
  >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
  >>> s = adapters.init(a, jax.random.key(0), params)
  >>> factored.transform(lambda p, x: x @ p["w"], a, *s)(params, jnp.ones((1, 4)))
  Array([[4., 4., 4.]], dtype=float32)
"""

from peftjax.factored._api import transform as transform
from peftjax.factored._interpret import FactoredFallbackWarning as FactoredFallbackWarning

__all__ = [
    "FactoredFallbackWarning",
    "transform",
]
