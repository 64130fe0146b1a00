# SPDX-License-Identifier: Apache-2.0
"""Quantised frozen bases (QLoRA-style): block-quantised weights, float32 adapters.

Keep a frozen base as blocks of int8 / int4 / NF4 values (qwix's quantisers)
or as a GGUF file's own Q8_0 / Q4_1 blocks, and train adapters on it with
``peftjax.factored``: every quantised leaf, adapted or not, is dequantised a tile
of output columns at a time inside each matmul that uses it, and never kept
as a float copy of the whole kernel across a step. Adapters, their gradients
and the optimizer state stay float32.

QLoRA: Efficient Finetuning of Quantized LLMs. Dettmers et al., 2023.
https://arxiv.org/abs/2305.14314 (NF4 ↔ ``nf4``; "paged optimizers" and double
quantisation are not reproduced.)

A recipe::

    qparams = quant.quantize_params(params, [Rule(where=r".*kernel", then=quant.nf4())])
    # or: cfg, qparams = llama.load_llama_params(gguf, keep_quantized=True)
    a = tree.assign(quant.abstract(qparams), [Rule(where=..., then=adapters.lora(8))])
    state = adapters.init(a, key, quant.abstract(qparams))  # DoRA/LoRA-XS: dequantize
    t = train.trainer(loss_fn, optax.adamw(1e-4), adapters=a)  # factored: no float W
    ts = t.init(key, qparams, state=state)
    ts, metrics = t.step(ts, batch, qparams)

``factored.transform(apply_fn, {}, {}, {})(qparams, x)`` runs the quantised model
for inference.

Exports: ``QuantFormat``, ``QuantizedArray``, ``Q8_0Blocks``, ``Q4_1Blocks``,
``int8``, ``int4``, ``nf4``, ``q8_0``, ``q4_1``, ``quantize``, ``dequantize``,
``quantize_params``, ``abstract``, ``is_quantized``, ``nbytes``, ``matmul``,
``tiled_product`` (``matmul`` on raw blocks), ``gguf_blocks`` (a GGUF
tensor's bytes as blocks), ``DEFAULT_TILE_BYTES``.

Example:
  >>> import jax.numpy as jnp
  >>> from peftjax import quant
  >>> w = quant.quantize(jnp.ones((64, 4)), quant.nf4())
  >>> quant.dequantize(w)[0, 0], quant.nbytes(w)
  (Array(1., dtype=float32), 144)
"""

from peftjax.quant._array import QuantizedArray as QuantizedArray
from peftjax.quant._array import abstract as abstract
from peftjax.quant._array import dequantize as dequantize
from peftjax.quant._array import from_codes as from_codes
from peftjax.quant._array import is_quantized as is_quantized
from peftjax.quant._array import nbytes as nbytes
from peftjax.quant._array import quantize as quantize
from peftjax.quant._array import quantize_params as quantize_params
from peftjax.quant._formats import Q4_1Blocks as Q4_1Blocks
from peftjax.quant._formats import Q8_0Blocks as Q8_0Blocks
from peftjax.quant._formats import QuantFormat as QuantFormat
from peftjax.quant._formats import gguf_blocks as gguf_blocks
from peftjax.quant._formats import int4 as int4
from peftjax.quant._formats import int8 as int8
from peftjax.quant._formats import nf4 as nf4
from peftjax.quant._formats import q4_1 as q4_1
from peftjax.quant._formats import q8_0 as q8_0
from peftjax.quant._matmul import DEFAULT_TILE_BYTES as DEFAULT_TILE_BYTES
from peftjax.quant._matmul import matmul as matmul
from peftjax.quant._matmul import tiled_product as tiled_product

__all__ = [
    "DEFAULT_TILE_BYTES",
    "Q4_1Blocks",
    "Q8_0Blocks",
    "QuantFormat",
    "QuantizedArray",
    "abstract",
    "dequantize",
    "from_codes",
    "gguf_blocks",
    "int4",
    "int8",
    "is_quantized",
    "matmul",
    "nbytes",
    "nf4",
    "q4_1",
    "q8_0",
    "quantize",
    "quantize_params",
    "tiled_product",
]
