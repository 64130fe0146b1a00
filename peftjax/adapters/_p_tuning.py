# SPDX-License-Identifier: Apache-2.0
"""P-tuning (v1): soft prompts produced by a small prompt encoder.

GPT Understands, Too. Liu, Zheng, Du, Ding, Qian, Yang & Tang, 2021.
https://arxiv.org/abs/2103.10385

The paper models the ``P`` continuous prompt embeddings ``h_i`` not as
free parameters but through a prompt encoder over trainable inputs ``e_i``:
``h_i = MLP([→h_i; ←h_i])`` where ``→h_i``/``←h_i`` are the forward/backward
states of a bidirectional LSTM over ``e_1..e_P`` (its prompt encoder).
Hugging Face PEFT (``tuners/p_tuning``, followed here, also for its layer
shapes and inits) offers two encoders:

* ``"lstm"``: ``E (P, d)`` → a bidirectional LSTM of ``num_layers`` layers
  (hidden ``h``, torch's gate order ``i, f, g, o`` and its two biases
  ``b_ih``, ``b_hh``) → ``Linear(2h, 2h)`` → ReLU → ``Linear(2h, d)``.
* ``"mlp"`` (PEFT's default, not in the paper): ``E`` → ``Linear(d, h)`` →
  ReLU → ``Linear(h, h)`` → ReLU → ``Linear(h, d)``.

Inits as torch builds them: ``E ~ N(0, 1)`` (``nn.Embedding``), every
``Linear`` weight and bias ``U(-1/√fan_in, 1/√fan_in)``, every LSTM weight
and bias ``U(-1/√h, 1/√h)``. PEFT's ``encoder_dropout`` (between LSTM layers,
default 0) is not applied: the encoder here is deterministic.

The encoder is used during training only: ``p_tuning_prompt`` gives the
``(P, d)`` prompt, which is what PEFT saves (``prompt_embeddings``) and what
peftjax's models take as ``prompt_embeddings``; after training keep
``PromptParams(p_tuning_prompt(params))`` and drop the encoder.

Linear kernels are stored ``(in, out)`` (peftjax's convention, transposed
from torch); the LSTM's ``w_ih (in, 4h)`` and ``w_hh (h, 4h)`` likewise.

Exports: ``PTuningMLP``, ``PTuningLSTM``, ``LSTMLayer``, ``p_tuning``,
``p_tuning_prompt``.
"""

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class LSTMLayer(NamedTuple):
    """One direction of one LSTM layer (gate order ``i, f, g, o``).

    Attributes:
      w_ih: ``(in, 4h)``; w_hh: ``(h, 4h)``; b_ih, b_hh: ``(4h,)``.
    """

    w_ih: jax.Array
    w_hh: jax.Array
    b_ih: jax.Array
    b_hh: jax.Array


class PTuningMLP(NamedTuple):
    """P-tuning's MLP prompt encoder (PEFT ``encoder_reparameterization_type="MLP"``).

    Attributes:
      embedding: ``(P, d)``.
      w1: ``(d, h)``; b1: ``(h,)``; w2: ``(h, h)``; b2: ``(h,)``;
      w3: ``(h, d)``; b3: ``(d,)``.
    """

    embedding: jax.Array
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array
    w3: jax.Array
    b3: jax.Array


class PTuningLSTM(NamedTuple):
    """P-tuning's LSTM prompt encoder (PEFT ``encoder_reparameterization_type="LSTM"``).

    Attributes:
      embedding: ``(P, d)``.
      forward: per layer, the forward direction's ``LSTMLayer``.
      backward: per layer, the backward direction's ``LSTMLayer``.
      w1: ``(2h, 2h)``; b1: ``(2h,)``; w2: ``(2h, d)``; b2: ``(d,)``.
    """

    embedding: jax.Array
    forward: tuple[LSTMLayer, ...]
    backward: tuple[LSTMLayer, ...]
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"p_tuning: {name} must be a positive int, got {value!r}")
    return int(value)


def _uniform(key, shape, bound, dtype):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _linear(key, fan_in, fan_out, dtype):
    kw, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    return _uniform(kw, (fan_in, fan_out), bound, dtype), _uniform(kb, (fan_out,), bound, dtype)


def p_tuning(key: jax.Array, num_tokens: int, hidden_size: int, encoder_hidden: int, *,
             encoder: str = "mlp", num_layers: int = 2,
             param_dtype: Any = jnp.float32) -> PTuningMLP | PTuningLSTM:
    """Creates a P-tuning prompt encoder with torch's (PEFT's) inits.

    Trainable parameters (PEFT's count): ``P·d + d·h + h + h·h + h + h·d + d``
    (MLP); ``P·d + Σ_layers 2·(4h·in_l + 4h·h + 8h) + 2h·2h + 2h + 2h·d + d``
    with ``in_0 = d``, ``in_l = 2h`` (LSTM).

    Args:
      key: PRNG key.
      num_tokens: ``P`` (PEFT's ``num_virtual_tokens``).
      hidden_size: ``d``, the model's embedding width (PEFT's ``token_dim``).
      encoder_hidden: ``h`` (PEFT's ``encoder_hidden_size``).
      encoder: ``"mlp"`` or ``"lstm"`` (PEFT's ``encoder_reparameterization_type``).
      num_layers: LSTM layers (PEFT's ``encoder_num_layers``; the MLP always
        has PEFT's three linear layers and ignores it).
      param_dtype: storage dtype.

    Returns:
      ``PTuningMLP`` or ``PTuningLSTM``.

    Raises:
      ValueError: a non-positive size or an unknown ``encoder``.

    Example:
      >>> import jax
      >>> p = p_tuning(jax.random.key(0), 3, 8, 5)
      >>> p.w1.shape, p.w3.shape
      ((8, 5), (5, 8))
      >>> q = jax.eval_shape(lambda: p_tuning(jax.random.key(0), 3, 8, 5, encoder="lstm"))
      >>> q.forward[0].w_ih.shape, q.forward[1].w_ih.shape, q.w1.shape
      ((8, 20), (10, 20), (10, 10))
    """
    p = _positive(num_tokens, "num_tokens")
    d = _positive(hidden_size, "hidden_size")
    h = _positive(encoder_hidden, "encoder_hidden")
    n = _positive(num_layers, "num_layers")
    if encoder not in ("mlp", "lstm"):
        raise ValueError(f"p_tuning: encoder must be 'mlp' or 'lstm', got {encoder!r}")
    return _init(key, p, d, h, n, encoder, jnp.dtype(param_dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _init(key, p, d, h, n, encoder, param_dtype):
    """The draws of ``p_tuning`` (one compile instead of one per draw)."""
    ke, key = jax.random.split(key)
    emb = jax.random.normal(ke, (p, d), jnp.float32).astype(param_dtype)
    if encoder == "mlp":
        k1, k2, k3 = jax.random.split(key, 3)
        w1, b1 = _linear(k1, d, h, param_dtype)
        w2, b2 = _linear(k2, h, h, param_dtype)
        w3, b3 = _linear(k3, h, d, param_dtype)
        return PTuningMLP(emb, w1, b1, w2, b2, w3, b3)
    keys = jax.random.split(key, 2 * n + 2)
    bound = 1.0 / math.sqrt(h)

    def layer(k, fan_in):
        a, b, c, e = jax.random.split(k, 4)
        return LSTMLayer(_uniform(a, (fan_in, 4 * h), bound, param_dtype),
                         _uniform(b, (h, 4 * h), bound, param_dtype),
                         _uniform(c, (4 * h,), bound, param_dtype),
                         _uniform(e, (4 * h,), bound, param_dtype))

    fwd = tuple(layer(keys[2 * i], d if i == 0 else 2 * h) for i in range(n))
    bwd = tuple(layer(keys[2 * i + 1], d if i == 0 else 2 * h) for i in range(n))
    w1, b1 = _linear(keys[-2], 2 * h, 2 * h, param_dtype)
    w2, b2 = _linear(keys[-1], 2 * h, d, param_dtype)
    return PTuningLSTM(emb, fwd, bwd, w1, b1, w2, b2)


def _lstm_direction(layer: LSTMLayer, x: jax.Array) -> jax.Array:
    """Runs one LSTM direction over ``x (P, in)`` from zero states; ``(P, h)``."""
    h = layer.w_hh.shape[0]
    gates_x = x @ layer.w_ih + (layer.b_ih + layer.b_hh)[None, :]

    def step(carry, gx):
        hp, cp = carry
        g = gx + hp @ layer.w_hh
        i, f, c_new, o = (g[k * h:(k + 1) * h] for k in range(4))
        c = jax.nn.sigmoid(f) * cp + jax.nn.sigmoid(i) * jnp.tanh(c_new)
        hn = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (hn, c), hn

    zero = jnp.zeros((h,), gates_x.dtype)
    _, out = jax.lax.scan(step, (zero, zero), gates_x)
    return out


def p_tuning_prompt(params: PTuningMLP | PTuningLSTM) -> jax.Array:
    """Returns the ``(P, d)`` prompt embeddings of a P-tuning encoder.

    Args:
      params: from ``p_tuning``.

    Returns:
      ``MLP(E)`` or ``MLP(BiLSTM(E))`` in float32 or the params' dtype:
      peftjax's models take it as ``prompt_embeddings``.

    Raises:
      TypeError: ``params`` of another type.

    Example:
      >>> import jax
      >>> p = p_tuning(jax.random.key(1), 2, 4, 3)
      >>> p_tuning_prompt(p).shape
      (2, 4)
    """
    if not isinstance(params, (PTuningMLP, PTuningLSTM)):
        raise TypeError(f"p_tuning_prompt: expected PTuningMLP or PTuningLSTM, got "
                        f"{type(params).__name__}")
    return _encode(params)


@jax.jit
def _encode(params: PTuningMLP | PTuningLSTM) -> jax.Array:
    if isinstance(params, PTuningMLP):
        x = jax.nn.relu(params.embedding @ params.w1 + params.b1[None, :])
        x = jax.nn.relu(x @ params.w2 + params.b2[None, :])
        return x @ params.w3 + params.b3[None, :]
    x = params.embedding
    for fwd, bwd in zip(params.forward, params.backward, strict=True):
        x = jnp.concatenate([_lstm_direction(fwd, x),
                             _lstm_direction(bwd, x[::-1])[::-1]], axis=-1)
    x = jax.nn.relu(x @ params.w1 + params.b1[None, :])
    return x @ params.w2 + params.b2[None, :]
