"""Plain-loop references for the ranking statistics (netprobe.select, examples/hparam_selection.py)."""

import math

import numpy as np


def tau_b_pairs_loop(x, y, keep):
    """Kendall's tau-b over the pairs (i, j), i < j, with keep(i, j): concordant minus discordant over
    sqrt(pairs untied in x * pairs untied in y), a plain double loop (NaN when either has no untied pair)."""
    s = nx = ny = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            if not keep(i, j):
                continue
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            s += dx * dy
            nx += dx != 0
            ny += dy != 0
    return s / math.sqrt(nx * ny) if nx and ny else math.nan


def jackknife_hit_rates(hit, sig, ref, ks, *, subset_size, n_draws, seed, level, groups=None):
    """The documented hit-rate intervals, in plain loops: ``n_draws`` subsets of ``subset_size``
    runs drawn as ``np.sort(np.argsort(rng.random((n_draws, n)), axis=1)[:, :m], axis=1)``; each
    subset's credit from ``hit(sig_subset, ref_subset, k)`` (both higher = better); the estimate is
    their mean, ``h_(i)`` the mean over the subsets without run ``i`` (without any run of group
    ``g`` when ``groups``), and the interval ``h +- z sqrt((G - 1)/G sum (h_(i) - mean)^2)`` clipped
    to [0, 1], ``z`` the normal quantile of ``(1 + level) / 2``."""
    from scipy import stats as _stats

    n = len(sig)
    rng = np.random.default_rng(seed)
    rows = np.sort(np.argsort(rng.random((n_draws, n)), axis=1)[:, :subset_size], axis=1)
    labels = list(range(n)) if groups is None else [str(g) for g in groups]
    units = sorted(set(labels))
    z = _stats.norm.ppf((1 + level) / 2)
    out = {}
    for k in ks:
        credits = [hit([sig[i] for i in row], [ref[i] for i in row], k) for row in rows]
        est = sum(credits) / len(credits)
        loo = []
        for u in units:
            kept = [c for c, row in zip(credits, rows) if all(labels[i] != u for i in row)]
            loo.append(sum(kept) / len(kept))
        mean = sum(loo) / len(loo)
        g = len(units)
        se = math.sqrt((g - 1) / g * sum((v - mean) ** 2 for v in loo))
        out[k] = (est, [max(0.0, est - z * se), min(1.0, est + z * se)])
    return out
