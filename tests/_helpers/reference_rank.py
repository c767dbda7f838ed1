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
