# SPDX-License-Identifier: Apache-2.0
"""Model merging and adapter arithmetic over parameter pytrees.

Each merge method has a vector core (``combine_*``, over task vectors) and a
params-level function ``θ = θ0 + scale·combine(τ_1..τ_T)``; rules select
which leaves take part. All functions are pure and jittable.
"""

from peftjax.merge import adapters as adapters
from peftjax.merge._breadcrumbs import breadcrumb_mask as breadcrumb_mask
from peftjax.merge._breadcrumbs import breadcrumbs as breadcrumbs
from peftjax.merge._breadcrumbs import combine_breadcrumbs as combine_breadcrumbs
from peftjax.merge._dare import Combine as Combine
from peftjax.merge._dare import combine_dare as combine_dare
from peftjax.merge._dare import dare as dare
from peftjax.merge._dare import drop_and_rescale as drop_and_rescale
from peftjax.merge._lines import layer_scales as layer_scales
from peftjax.merge._lines import lines as lines
from peftjax.merge._model_stock import interpolation_ratio as interpolation_ratio
from peftjax.merge._model_stock import model_stock as model_stock
from peftjax.merge._task_vectors import combine_linear as combine_linear
from peftjax.merge._task_vectors import task_arithmetic as task_arithmetic
from peftjax.merge._task_vectors import task_vector as task_vector
from peftjax.merge._ties import Trim as Trim
from peftjax.merge._ties import combine_ties as combine_ties
from peftjax.merge._ties import disjoint_merge as disjoint_merge
from peftjax.merge._ties import elect_sign as elect_sign
from peftjax.merge._ties import ties as ties
from peftjax.merge._ties import trim as trim

__all__ = [
    "Combine",
    "Trim",
    "adapters",
    "breadcrumb_mask",
    "breadcrumbs",
    "combine_breadcrumbs",
    "combine_dare",
    "combine_linear",
    "combine_ties",
    "dare",
    "disjoint_merge",
    "drop_and_rescale",
    "elect_sign",
    "interpolation_ratio",
    "layer_scales",
    "lines",
    "model_stock",
    "task_arithmetic",
    "task_vector",
    "ties",
    "trim",
]
