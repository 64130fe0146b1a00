# SPDX-License-Identifier: Apache-2.0
"""Loss curves as a PNG (matplotlib, optional: the ``train`` extra).

Exports: ``plot_curves``.
"""

import importlib.util
from collections.abc import Mapping, Sequence

import numpy as np

_EXTRA = "pip install 'peftjax[train]' (or matplotlib)"


def require_matplotlib(what: str) -> None:
    """Raises an ImportError naming ``what`` and the extra when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(f"{what} needs matplotlib, which is not installed: {_EXTRA}")


def plot_curves(path: str, curves: Mapping[str, Sequence[float] | Mapping[int, float]], *,
                title: str = "", ylabel: str = "training loss") -> None:
    """Saves curves (one line per name) to a PNG with matplotlib's Agg backend.

    Each curve is drawn faintly as it is, with a moving average (window
    ``min(10, n // 5)``) on top when it has at least 10 points, so the trend
    stays readable on small, noisy batches. Non-finite values leave gaps.

    Args:
      path: the PNG file to write.
      curves: ``{name: values}``; values are a sequence (x = 1, 2, ...) or a
        mapping ``{step: value}`` (e.g. the rows of a resumed run's log).
      title: the figure title.
      ylabel: the y-axis label.

    Returns:
      None; the file is written when this returns.

    Raises:
      ImportError: matplotlib is not installed (the ``train`` extra).
      ValueError: ``curves`` is empty or a curve has no values.

    Example:
      >>> import os, tempfile
      >>> p = os.path.join(tempfile.mkdtemp(), "loss.png")
      >>> plot_curves(p, {"lora": [3.0, 2.5, 2.2], "full": {1: 3.0, 2: 2.4}})
      >>> os.path.getsize(p) > 0
      True
    """
    require_matplotlib("plot_curves")
    if not curves:
        raise ValueError("plot_curves: curves is empty; pass {name: values}")
    series = {}
    for name, values in curves.items():
        if isinstance(values, Mapping):
            xs = np.asarray(sorted(values), dtype=np.int64)
            ys = np.asarray([values[x] for x in sorted(values)], dtype=np.float64)
        else:
            ys = np.asarray(values, dtype=np.float64)
            xs = np.arange(1, len(ys) + 1)
        if ys.ndim != 1 or not len(ys):
            raise ValueError(f"plot_curves: curve {name!r} must be a non-empty 1-D "
                             f"sequence or {{step: value}} mapping, got shape {ys.shape}")
        series[name] = (xs, ys)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for name, (xs, ys) in series.items():
            (line,) = ax.plot(xs, ys, alpha=0.35, linewidth=1)
            w = min(10, len(ys) // 5)
            if w > 1:
                smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
                ax.plot(xs[w - 1:], smooth, color=line.get_color(),
                        label=f"{name} ({w}-step mean)")
            else:
                line.set_label(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
