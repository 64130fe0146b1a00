# SPDX-License-Identifier: Apache-2.0
"""Target presets of the Llama family, and PEFT ``target_modules`` translation.

Each preset returns ``peftjax.tree.Rule`` objects whose regexes match both
layer layouts (``layers/{i}/...`` unrolled, ``layers/...`` scanned), with
``then`` as the payload (an adapter, a label, a mask value):

==========================  ===========================================
``attention_rules``         ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
``mlp_rules``               ``gate_proj``, ``up_proj``, ``down_proj``
``attention_mlp_rules``     both
``all_linear_rules``        every linear layer except the head: the same
                            seven projections (PEFT's ``"all-linear"``
                            leaves the output embedding ``lm_head`` out)
==========================  ===========================================

``peft_rules(cfg, target_modules, then)`` translates a PEFT recipe's
``target_modules`` (list, regex or ``"all-linear"``) with PEFT's own matching
semantics over this family's key map (``peftjax.io.peft_target_rules``).

Exports: ``attention_rules``, ``mlp_rules``, ``attention_mlp_rules``,
``all_linear_rules``, ``peft_rules``, ``PEFT_DEFAULT_TARGETS``.
"""

from collections.abc import Sequence
from typing import Any

from peftjax import io as pio
from peftjax import tree
from peftjax.models.llama import _config, _peft_keys

_LAYER = r"layers/(?:\d+/)?"
ATTENTION = _LAYER + r"self_attn/(?:q|k|v|o)_proj/kernel"
MLP = _LAYER + r"mlp/(?:gate|up|down)_proj/kernel"
# PEFT's default LoRA targets for model_type "llama" (used when a recipe's
# LoraConfig leaves target_modules unset).
PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")


def attention_rules(then: Any) -> list[tree.Rule]:
    """Rules for the attention projections ``q/k/v/o_proj`` (either layout).

    Args:
      then: the payload (e.g. ``peftjax.adapters.lora(8)``).

    Returns:
      ``[Rule(where=<q|k|v|o_proj kernels>, then=then)]``.

    Example:
      >>> attention_rules("lora")[0].matches("layers/3/self_attn/o_proj/kernel", None)
      True
    """
    return [tree.Rule(where=ATTENTION, then=then)]


def mlp_rules(then: Any) -> list[tree.Rule]:
    """Rules for the SwiGLU projections ``gate/up/down_proj`` (either layout).

    Args:
      then: the payload.

    Returns:
      ``[Rule(where=<gate|up|down_proj kernels>, then=then)]``.

    Example:
      >>> mlp_rules("lora")[0].matches("layers/mlp/down_proj/kernel", None)
      True
    """
    return [tree.Rule(where=MLP, then=then)]


def attention_mlp_rules(then: Any) -> list[tree.Rule]:
    """Rules for the attention and MLP projections.

    Args:
      then: the payload.

    Returns:
      The attention rule, then the MLP rule.

    Example:
      >>> len(attention_mlp_rules("lora"))
      2
    """
    return attention_rules(then) + mlp_rules(then)


def all_linear_rules(then: Any) -> list[tree.Rule]:
    """Every linear layer except the LM head (PEFT's ``"all-linear"``).

    The untied ``lm_head/kernel`` and the token embedding are left out, as
    PEFT leaves out the output embedding; in the Llama family this is the
    seven projections of every layer.

    Args:
      then: the payload.

    Returns:
      Rules for ``q/k/v/o/gate/up/down_proj``.

    Example:
      >>> [r.matches("lm_head/kernel", None) for r in all_linear_rules("lora")]
      [False, False]
    """
    return attention_mlp_rules(then)


def peft_rules(
    cfg: _config.LlamaConfig,
    target_modules: str | Sequence[str] | None,
    then: Any,
    *,
    embedding_then: Any = None,
    scanned: bool = False,
    **selection: Any,
) -> list[tree.Rule]:
    """Rules that target what PEFT's ``LoraConfig(target_modules=...)`` targets.

    Args:
      cfg: the model config (layers, tied head).
      target_modules: PEFT's ``target_modules``: a list (suffix semantics), a
        regex string (``re.fullmatch`` on module names) or ``"all-linear"``;
        None means PEFT's Llama default ``PEFT_DEFAULT_TARGETS``.
      then: payload for the selected linear weights.
      embedding_then: payload when ``embed_tokens`` is selected.
      scanned: make rules for the scanned layout.
      **selection: PEFT's ``exclude_modules``, ``modules_to_save``,
        ``layers_to_transform``, ``layers_pattern``.

    Returns:
      Rules for ``peftjax.tree.assign``.

    Raises:
      ValueError: a selection PEFT rejects (a norm, a container such as
        ``mlp``, nothing matched), or a partial layer selection with
        ``scanned=True``. On a tied model ``lm_head`` is not a module here.

    Example:
      >>> cfg = _config.LlamaConfig(vocab_size=8, hidden_size=8,
      ...     intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
      ...     num_key_value_heads=1)
      >>> [r.where for r in peft_rules(cfg, ["q_proj"], "lora", scanned=True)]
      ['layers/self_attn/q_proj/kernel']
    """
    if target_modules is None:
        target_modules = list(PEFT_DEFAULT_TARGETS)
    if "output_modules" in selection:
        raise TypeError("peft_rules: output_modules is set by the family (lm_head)")
    out = () if cfg.tie_word_embeddings else ("lm_head",)
    return pio.peft_target_rules(
        target_modules, _peft_keys.peft_key_map(cfg), then,
        embedding_then=embedding_then, scanned=scanned, output_modules=out,
        **selection)
