"""Figures for TensorBoard: ablation/noise curves and similarity heatmaps.

matplotlib is optional (the ``plots`` extra) and imported lazily; without it every function
returns ``None`` after one clear warning, and callers log scalars only. Knows nothing of Lightning.

Figures are built with matplotlib's object API (no pyplot figure manager) and a fixed layout (no
``tight_layout``, no legend placement search), so building one costs a fraction of rendering it;
rendering and PNG encoding remain, which is why the monitors draw media only every
``media_every``-th measurement (docs/benchmarks.md has the costs).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence

import torch

__all__ = ["have_matplotlib", "curves_figure", "heatmap_figure", "scatter_figure"]

_warned = False


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (figures need it; without it the monitors log scalars only)."""
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
    """A square similarity matrix as an annotated heatmap, legible at a glance: at least 480 x 400
    pixels, the colour scale spanning the values shown (so 0.97 and 1.00 differ in colour; the
    colour bar says the range), each cell's value printed (3 decimals when the values span less
    than 0.1), NaN cells (not computed) grey and marked "n/a"."""
    if not have_matplotlib():
        return None
    import numpy as np
    from matplotlib.figure import Figure

    m = matrix.detach().cpu().double().numpy()
    k = len(labels)
    finite = m[np.isfinite(m)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    if hi - lo < 1e-3:
        lo, hi = lo - 0.005, hi + 0.005
    span = hi - lo
    digits = 3 if span < 0.1 else 2
    side = max(4.8, 1.6 + 0.75 * k)
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="tight")
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(m)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    im = ax.imshow(masked, vmin=lo, vmax=hi, cmap=cmap)
    fs = 9 if k <= 6 else 7 if k <= 12 else 5
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=fs)
    ax.set_yticks(range(k), labels, fontsize=fs)
    for i in range(k):
        for j in range(k):
            v = m[i, j]
            if not np.isfinite(v):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=fs, color="k")
                continue
            frac = (v - lo) / span
            ax.text(j, i, f"{v:.{digits}f}", ha="center", va="center", fontsize=fs, color="w" if frac < 0.6 else "k")
    cb = fig.colorbar(im, ax=ax, fraction=0.046)
    cb.ax.tick_params(labelsize=8)
    ax.set_title(f"{title}\n(colour scale {lo:.{digits}f}-{hi:.{digits}f})", fontsize=10)
    return fig


def scatter_figure(points: Dict[str, Any], *, title: str, xlabel: str, ylabel: str) -> Optional[Any]:
    """One colour per layer: ``{layer: (x, y)}`` tensors of one point per unit."""
    if not have_matplotlib():
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4), dpi=100)
    ax = fig.add_axes((0.13, 0.13, 0.83, 0.78))
    for name, (xs, ys) in points.items():
        ax.scatter(xs.detach().cpu().double().numpy(), ys.detach().cpu().double().numpy(), s=9, alpha=0.7, label=f"{name} ({len(xs)} units)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig
