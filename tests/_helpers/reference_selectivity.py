"""numpy references for class selectivity and binned mutual information, from the formulas."""

import numpy as np


def selectivity_ref(acts, labels, num_classes):
    """Morcos et al. 2018: (mu_max - mean of other class means) / (mu_max + mean of others), per unit."""
    classes = [c for c in range(num_classes) if np.any(labels == c)]
    out = []
    for j in range(acts.shape[1]):
        mus = np.array([acts[labels == c, j].mean() for c in classes])
        top = mus.max()
        rest = (mus.sum() - top) / (len(mus) - 1)
        out.append(np.nan if top + rest == 0 else (top - rest) / (top + rest))
    return np.array(out)


def mi_ref(acts, labels, num_classes, bins):
    """Plug-in MI in bits with equal-frequency bins: edge k = sorted[floor(k n / bins)], bin = #{edges <= v}."""
    n, d = acts.shape
    out = np.zeros(d)
    for j in range(d):
        col = acts[:, j]
        srt = np.sort(col)
        edges = np.array([srt[min(k * n // bins, n - 1)] for k in range(1, bins)])
        b = np.array([np.sum(edges <= v) for v in col])
        joint = np.zeros((bins, num_classes))
        for bi, c in zip(b, labels):
            joint[bi, c] += 1
        p = joint / n
        pb, pc = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
        nz = p > 0
        out[j] = np.sum(p[nz] * np.log2(p[nz] / (pb @ pc)[nz]))
    return out
