# SPDX-License-Identifier: Apache-2.0
"""Target presets of the BERT family, and PEFT ``target_modules`` translation.

Each preset returns ``peftjax.tree.Rule`` objects over the encoder layers
(``layers/{i}/...``) with ``then`` as the payload:

==========================  ===================================================
``attention_rules``         ``attention/query``, ``key``, ``value``, ``output``
``mlp_rules``               ``intermediate``, ``output`` (the feed-forward)
``attention_mlp_rules``     both
``all_linear_rules``        every encoder linear layer; the ``classifier`` head
                            is left out (PEFT's ``"all-linear"`` with
                            ``task_type="SEQ_CLS"``; train it fully instead)
==========================  ===================================================

``peft_rules(cfg, target_modules, then)`` translates a PEFT recipe's
``target_modules`` with PEFT's matching semantics over this family's key map.

Exports: ``attention_rules``, ``mlp_rules``, ``attention_mlp_rules``,
``all_linear_rules``, ``peft_rules``, ``PEFT_DEFAULT_TARGETS``.
"""

from collections.abc import Sequence
from typing import Any

from peftjax import io as pio
from peftjax import tree
from peftjax.models.bert import _config, _peft_keys

ATTENTION = r"layers/\d+/attention/(?:query|key|value|output)/kernel"
MLP = r"layers/\d+/(?:intermediate|output)/kernel"
# PEFT's default LoRA targets for model_type "bert".
PEFT_DEFAULT_TARGETS = ("query", "value")


def attention_rules(then: Any) -> list[tree.Rule]:
    """Rules for the self-attention ``query/key/value`` and its output projection.

    Args:
      then: the payload (e.g. ``peftjax.adapters.lora(8)``).

    Returns:
      ``[Rule(where=<attention kernels>, then=then)]``.

    Example:
      >>> attention_rules("lora")[0].matches("layers/0/attention/key/kernel", None)
      True
    """
    return [tree.Rule(where=ATTENTION, then=then)]


def mlp_rules(then: Any) -> list[tree.Rule]:
    """Rules for the feed-forward ``intermediate`` and ``output`` kernels.

    Args:
      then: the payload.

    Returns:
      ``[Rule(where=<feed-forward kernels>, then=then)]``.

    Example:
      >>> mlp_rules("lora")[0].matches("layers/1/attention/output/kernel", None)
      False
    """
    return [tree.Rule(where=MLP, then=then)]


def attention_mlp_rules(then: Any) -> list[tree.Rule]:
    """Rules for the attention and feed-forward kernels.

    Args:
      then: the payload.

    Returns:
      The attention rule, then the feed-forward rule.

    Example:
      >>> len(attention_mlp_rules("lora"))
      2
    """
    return attention_rules(then) + mlp_rules(then)


def all_linear_rules(then: Any) -> list[tree.Rule]:
    """Every encoder linear layer; the classification head is left out.

    Args:
      then: the payload.

    Returns:
      Rules for the six kernels of every layer.

    Example:
      >>> [r.matches("classifier/kernel", None) for r in all_linear_rules("lora")]
      [False, False]
    """
    return attention_mlp_rules(then)


def peft_rules(
    cfg: _config.BertConfig,
    target_modules: str | Sequence[str] | None,
    then: Any,
    *,
    num_labels: int | None = None,
    backbone_prefix: str | None = None,
    embedding_then: Any = None,
    **selection: Any,
) -> list[tree.Rule]:
    """Rules that target what PEFT's ``LoraConfig(target_modules=...)`` targets.

    Module names are transformers' (``encoder.layer.0.attention.self.query``,
    with ``bert.`` before them for ``BertForSequenceClassification``), as in
    ``peft_key_map``. ``"all-linear"`` leaves the ``classifier`` out (PEFT
    with ``task_type="SEQ_CLS"``). peftjax's BERT has no pooler, which
    transformers' classification model has: ``"all-linear"`` in PEFT also
    adapts ``bert.pooler.dense``.

    Args:
      cfg: the config (number of layers).
      target_modules: PEFT's ``target_modules`` (list, regex or "all-linear");
        None means PEFT's BERT default ``PEFT_DEFAULT_TARGETS``.
      then: payload for the selected linear weights.
      num_labels: the classification layout (as ``peft_key_map``).
      backbone_prefix: as ``peft_key_map``.
      embedding_then: payload when an embedding table is selected.
      **selection: PEFT's ``exclude_modules``, ``modules_to_save``,
        ``layers_to_transform``, ``layers_pattern``.

    Returns:
      Rules for ``peftjax.tree.assign`` (unrolled layout).

    Raises:
      ValueError: a selection PEFT rejects (a LayerNorm, a container such as
        ``attention``, nothing matched).

    Example:
      >>> cfg = _config.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2,
      ...     num_attention_heads=2, intermediate_size=8)
      >>> [r.where for r in peft_rules(cfg, None, "lora")]
      ['layers/\\\\d+/attention/query/kernel', 'layers/\\\\d+/attention/value/kernel']
    """
    if target_modules is None:
        target_modules = list(PEFT_DEFAULT_TARGETS)
    if "output_modules" in selection:
        raise TypeError("peft_rules: output_modules is set by the family (classifier)")
    key_map = _peft_keys.peft_key_map(cfg, num_labels=num_labels,
                                      backbone_prefix=backbone_prefix)
    head = [k.module for p, k in key_map.items() if p == "classifier/kernel"]
    return pio.peft_target_rules(
        target_modules, key_map, then, embedding_then=embedding_then,
        output_modules=tuple(head), **selection)
