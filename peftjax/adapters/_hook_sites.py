# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the hook-based routing methods (Poly, Arrow, X-LoRA).

A model hook (``peftjax.models.Hooks``) sees each projection by its site
name inside a layer (``"self_attn/q_proj"``, BERT ``"attention/query"``);
these helpers find the projections' shapes in a model's params (unrolled
``layers/<i>/<site>/kernel`` or scanned ``layers/<site>/kernel`` with a
leading layer axis) and select them by PEFT-style ``target_modules``.

Exports: nothing public.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from peftjax import tree


def site_shapes(params: Any, fn: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """``(num_layers, {site: (in, out)})`` of every kernel under ``layers``.

    Raises:
      ValueError: ``params`` has no ``layers`` or the layers differ.
    """
    if not isinstance(params, Mapping) or "layers" not in params:
        raise ValueError(f"{fn}: params has no 'layers' (pass a Llama's or BERT's params)")
    layers = params["layers"]
    if isinstance(layers, Mapping) and not all(str(k).isdigit() for k in layers):
        flat = dict(tree.flatten(layers))  # scanned: leading layer axis
        shapes = {p[: -len("/kernel")]: tuple(np.shape(v)) for p, v in flat.items()
                  if p.endswith("/kernel") and len(np.shape(v)) == 3}
        n = {s[0] for s in shapes.values()}
        if len(n) != 1:
            raise ValueError(f"{fn}: scanned layers disagree on the layer count {n}")
        return n.pop(), {k: (s[1], s[2]) for k, s in shapes.items()}
    seq = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    per = [{p[: -len("/kernel")]: tuple(np.shape(v)) for p, v in tree.flatten(lay)
            if p.endswith("/kernel") and len(np.shape(v)) == 2} for lay in seq]
    if any(p != per[0] for p in per):
        raise ValueError(f"{fn}: the layers' kernels differ in shape")
    return len(per), per[0]


def select(shapes: Mapping[str, tuple[int, int]], targets: Sequence[str] | str,
           fn: str) -> dict[str, tuple[int, int]]:
    """The sites whose last name part is in ``targets`` (a list) or, for a
    string, whose site name contains it as a regex match (PEFT's
    ``target_modules`` on module names; BERT's ``"dense"`` is the site names
    ``attention/output``, ``intermediate``, ``output``)."""
    import re

    alias = {"attention/query": "query", "attention/key": "key",
             "attention/value": "value", "attention/output": "dense",
             "intermediate": "dense", "output": "dense"}
    out = {}
    for site, shp in shapes.items():
        last = alias.get(site, site.rsplit("/", 1)[-1])
        if isinstance(targets, str):
            ok = re.search(targets, site) is not None
        else:
            ok = last in targets or site in targets
        if ok:
            out[site] = shp
    if not out:
        raise ValueError(f"{fn}: target_modules={targets!r} match no projection "
                         f"(sites: {sorted(shapes)})")
    return out
