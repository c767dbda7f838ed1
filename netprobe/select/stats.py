"""Rank statistics between a signal and a reference, written in numpy: ranks, Spearman's rho,
Kendall's tau-b, top-k hit probabilities, their row-wise (one row per bootstrap replicate) and
masked/grouped forms, percentile bootstrap intervals (over runs or groups of runs), the paired
tau difference and the cross-validated choice of a signal.

Inputs are plain sequences or arrays; refusals raise :class:`~netprobe.select.SelectionError`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from netprobe.select.errors import SelectionError, _plural


def _chunks(rows: int, n: int) -> Iterable[slice]:
    step = max(1, 2_000_000 // max(1, n * n))  # bound the (rows, n, n) comparison arrays (~16 MB each)
    for i in range(0, rows, step):
        yield slice(i, min(rows, i + step))


def _rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (by sorting: the 1-D statistics and the tables'
    reference ranks; a NaN sorts last, as a value of its own)."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=float)
    sa = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sa[j + 1] == sa[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _avg_ranks_rows(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(rows, n)``: each entry's average rank among its row's ``valid`` entries (``#less + (#equal
    + 1) / 2``, itself among the equal), 0 at the other entries."""
    less = ((x[:, None, :] < x[:, :, None]) & valid[:, None, :]).sum(-1)
    equal = ((x[:, None, :] == x[:, :, None]) & valid[:, None, :]).sum(-1)
    return np.where(valid, less + (equal + 1) / 2.0, 0.0)


def _pearson_rows(rx: np.ndarray, ry: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pearson's correlation of each row pair of ``rx``, ``ry`` ``(rows, n)`` over the row's ``valid``
    entries (``rx``, ``ry`` hold 0 at the others); NaN where a side is constant."""
    cnt = valid.sum(1, keepdims=True).astype(float)
    rx = np.where(valid, rx - rx.sum(1, keepdims=True) / cnt, 0.0)
    ry = np.where(valid, ry - ry.sum(1, keepdims=True) / cnt, 0.0)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12, (rx * ry).sum(1) / den, np.nan)


def _paired(a: Sequence[float], b: Sequence[float], what: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``a``, ``b`` as 1-D float arrays of one length (else :class:`SelectionError`); ``None``
    when either holds a NaN (the statistic is then NaN, as scipy's with ``nan_policy="propagate"``)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise SelectionError(f"Expected the two sequences of {what} to be 1-D of one length, but got shapes {x.shape} and {y.shape}.")
    if np.isnan(x).any() or np.isnan(y).any():
        return None
    return x, y


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks), as
    ``scipy.stats.spearmanr``: NaN if a side is constant, has fewer than 2 values, or holds a NaN;
    infinite values are ranked as the largest or smallest. Sequences of different lengths raise
    :class:`SelectionError`."""
    pair = _paired(a, b, "spearman_rho")
    if pair is None or len(pair[0]) < 2:
        return float("nan")
    ra, rb = _rankdata(pair[0]), _rankdata(pair[1])
    return float(_pearson_rows(ra[None], rb[None], np.ones((1, len(ra)), dtype=bool))[0])


def _spearman_rows_masked(x: np.ndarray, y: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Spearman's rho (average ranks) of each row over its ``valid`` entries; NaN where a side is constant."""
    out = np.empty(len(x))
    for sl in _chunks(len(x), x.shape[1]):
        v = valid[sl]
        out[sl] = _pearson_rows(_avg_ranks_rows(x[sl], v), _avg_ranks_rows(y[sl], v), v)
    return out


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho (average ranks) of each row pair; NaN where a row is constant."""
    return _spearman_rows_masked(x, y, np.ones(x.shape, dtype=bool))


def _signs(x: np.ndarray) -> np.ndarray:
    """``(rows, n, n)``: ``sign(x[i] - x[j])`` by comparison (two equal infinities are a tie)."""
    a, b = x[:, :, None], x[:, None, :]
    return (a > b).astype(np.float64) - (a < b)


def _kendall_rows_grouped(x: np.ndarray, y: np.ndarray, codes: np.ndarray, draw: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row of a cluster-bootstrap replicate (``x``, ``y``, ``codes``, ``draw``,
    ``valid`` all ``(rows, L)``) over its pairs ``i < j`` of real entries, leaving out the pairs of two
    runs of the same group that came from two different draws of it (kept, they would count each
    within-group pair once per pair of copies, over-weighting the seed-to-seed pairs; a pair of
    copies of one run is tied on both sides and never counts)."""
    out = np.empty(len(x))
    iu = np.triu_indices(x.shape[1], 1)
    for sl in _chunks(len(x), x.shape[1]):
        dx = _signs(x[sl])[:, iu[0], iu[1]]
        dy = _signs(y[sl])[:, iu[0], iu[1]]
        c, d, v = codes[sl], draw[sl], valid[sl]
        keep = (v[:, :, None] & v[:, None, :]) & ~((c[:, :, None] == c[:, None, :]) & (d[:, :, None] != d[:, None, :]))
        keep = keep[:, iu[0], iu[1]]
        dx, dy = dx * keep, dy * keep
        den = np.sqrt((dx != 0).sum(1).astype(float) * (dy != 0).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[sl] = np.where(den > 0, (dx * dy).sum(1) / den, np.nan)
    return out


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair of ``x``, ``y`` ``(rows, n)`` over all its pairs (the grouped
    form with every entry real and a group of its own); NaN where a row is constant."""
    own = np.broadcast_to(np.arange(x.shape[1]), x.shape)
    return _kendall_rows_grouped(x, y, own, np.zeros(x.shape, dtype=np.int64), np.ones(x.shape, dtype=bool))


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b, (concordant - discordant) / sqrt((n0 - ties_a)(n0 - ties_b)), O(n^2), as
    ``scipy.stats.kendalltau``: NaN if a side is constant, has fewer than 2 values, or holds a NaN;
    infinite values compare as the largest or smallest (two equal infinities are a tie). Sequences
    of different lengths raise :class:`SelectionError`."""
    pair = _paired(a, b, "kendall_tau")
    if pair is None or len(pair[0]) < 2:
        return float("nan")
    return float(_kendall_rows(pair[0][None], pair[1][None])[0])


def top_k_hits(
    signal: Sequence[float], reference: Sequence[float], ks: Iterable[int], *, mode: str = "max",
    reference_mode: str = "max", subset_size: Optional[int] = None, n_draws: int = 10_000, seed: int = 0,
) -> Dict[int, float]:
    """Probability that the run with the best signal in a random subset is in that subset's top ``k``
    by the reference (module docstring). Ties are broken at random, in expectation: a tie for the
    best signal averages over the tied runs, and a run tied with ``e`` others by the reference, with
    ``b`` runs strictly better, is in the top ``k`` with probability ``clip((k - b) / (e + 1), 0, 1)``.
    Every ``k`` must be below the subset size (at or above it, every pick is a hit); a NaN on either
    side makes every rate NaN."""
    _check_directions(mode, reference_mode)
    sig = np.asarray(signal, float) * (1 if mode == "max" else -1)
    ref = np.asarray(reference, float) * (1 if reference_mode == "max" else -1)
    n = len(sig)
    m = n if subset_size is None else int(subset_size)
    if not 1 <= m <= n:
        raise SelectionError(f"Expected `subset_size` in [1, {n}] (the number of runs), but got {subset_size}.")
    if not isinstance(n_draws, int) or n_draws < 1:
        raise SelectionError(f"Expected `n_draws` to be an int >= 1 (resampled subsets), but got {n_draws!r}.")
    ks = sorted(set(int(k) for k in ks))
    bad = [k for k in ks if not 1 <= k < m]
    if bad:
        raise SelectionError(f"Expected every k in [1, {m - 1}] (below the subset size {m}: every pick is among the top {m} "
                             f"of {m}), but got k={bad[0]}.")
    if len(ref) != n:
        raise SelectionError(f"Expected `signal` and `reference` of one length, but got {n} and {len(ref)}.")
    if np.isnan(sig).any() or np.isnan(ref).any():
        return {k: float("nan") for k in ks}
    credits, _ = _subset_credits(sig, ref, ks, m, n_draws, seed)
    return {k: float(credits[:, i].mean()) for i, k in enumerate(ks)}


def _subset_credits(sig: np.ndarray, ref: np.ndarray, ks: Sequence[int], m: int, n_draws: int,
                    seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(credits (D, len(ks)), idx (D, m))``: the hit credit of each of ``D`` subsets of ``m`` of the
    runs (oriented ``sig``, ``ref``), drawn without replacement as the rows of
    ``np.sort(np.argsort(np.random.default_rng(seed).random((n_draws, n)), axis=1)[:, :m], axis=1)``;
    with ``m == n`` the one subset of every run."""
    n = len(sig)
    if m == n:
        idx = np.arange(n)[None]
    else:
        rng = np.random.default_rng(seed)
        idx = np.sort(np.argsort(rng.random((n_draws, n)), axis=1)[:, :m], axis=1)
    return _hit_credit_rows(sig[idx], ref[idx], ks, idx), idx


def top_k_intervals(
    signal: Sequence[float], reference: Sequence[float], ks: Iterable[int], *, mode: str = "max",
    reference_mode: str = "max", subset_size: Optional[int] = None, n_draws: int = 10_000, seed: int = 0,
    level: float = 0.95, groups: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
    """The top-k hit rates of :func:`top_k_hits` (the same draws: equal estimates for equal
    arguments) with delete-one jackknife intervals, which never resample a run twice.

    A hit rate is a mean over subsets of ``subset_size`` distinct runs. Its leave-one-out values
    ``h_(i)`` are the means over the drawn subsets without run ``i`` (with ``groups``: without any
    run of group ``g``, a grouped jackknife); the interval is ``h +- z * se``, with
    ``se = sqrt((G - 1) / G * sum((h_(i) - mean h_(.))^2))`` over the ``G`` runs (groups), ``z``
    the normal quantile of ``(1 + level) / 2``, clipped to ``[0, 1]``. So it always holds its
    estimate. A bootstrap with replacement would judge subsets of fewer distinct runs, in which any
    pick is more often among the top ``k`` (an interval that can exclude its own estimate).

    Undefined (intervals ``None``, with the reason) when ``subset_size`` is the number of runs (the
    rate is then one pick's 0/1 outcome), when fewer than 2 runs (groups) can be left out, or when
    a side holds a NaN.

    Returns:
        ``{"estimate": {k: rate}, "interval": {k: [lo, hi] or None}, "undefined": reason or None,
        "method": "jackknife", "resampled": "runs" | "groups"}``.

    Example:
        >>> r = top_k_intervals([0.9, 0.8, 0.5, 0.4, 0.2, 0.1], [0.8, 0.9, 0.6, 0.5, 0.3, 0.1], [1], subset_size=3)
        >>> lo, hi = r["interval"][1]
        >>> lo <= r["estimate"][1] <= hi
        True
    """
    est = top_k_hits(signal, reference, ks, mode=mode, reference_mode=reference_mode, subset_size=subset_size,
                     n_draws=n_draws, seed=seed)
    level = _check_level(level)
    ks = sorted(est)
    sig = np.asarray(signal, float) * (1 if mode == "max" else -1)
    ref = np.asarray(reference, float) * (1 if reference_mode == "max" else -1)
    n = len(sig)
    m = n if subset_size is None else int(subset_size)
    codes = _group_codes(groups, n)
    out: Dict[str, Any] = {"estimate": est, "interval": {k: None for k in ks}, "undefined": None, "method": "jackknife",
                           "resampled": "runs" if codes is None else "groups"}
    if np.isnan(sig).any() or np.isnan(ref).any():
        out["undefined"] = "a signal or reference is NaN"
        return out
    if m == n:
        out["undefined"] = (f"the subset holds all {n} runs: the rate is one pick's outcome, 0 or 1 (pass a subset size "
                            "below the number of runs for a rate over subsets, with an interval)")
        return out
    credits, idx = _subset_credits(sig, ref, ks, m, n_draws, seed)
    member = np.zeros((len(idx), n), dtype=bool)
    member[np.arange(len(idx))[:, None], idx] = True
    if codes is not None:
        n_units = int(codes.max()) + 1
        member = np.stack([member[:, codes == g].any(1) for g in range(n_units)], axis=1)
    else:
        n_units = n
    left = ~member  # [draw, unit]: the draw holds no run of the unit
    counts = left.sum(0)
    if n_units < 2 or (counts == 0).any():
        out["undefined"] = (f"{_plural(n_units, 'group' if codes is not None else 'run')}: every drawn subset holds one of "
                            "them, so none can be left out" if n_units >= 2 else "one group: nothing to leave out")
        return out
    loo = (left.T.astype(float) @ credits) / counts[:, None]  # (units, K)
    se = np.sqrt((n_units - 1) / n_units * ((loo - loo.mean(0)) ** 2).sum(0))
    z = statistics.NormalDist().inv_cdf((1 + level) / 2)
    for i, k in enumerate(ks):
        h = est[k]
        out["interval"][k] = [float(max(0.0, h - z * se[i])), float(min(1.0, h + z * se[i]))]
    return out


def _check_directions(mode: str, reference_mode: str) -> None:
    if mode not in ("max", "min") or reference_mode not in ("max", "min"):
        raise SelectionError(f"Expected `mode` and `reference_mode` to be 'max' or 'min', but got {mode!r}, {reference_mode!r}.")


def _first_copies(ids: np.ndarray) -> np.ndarray:
    """``(rows, L)`` bool: the first entry of each run id in its row (a bootstrap draws runs with
    replacement: copies of one run are one run, not a tie)."""
    first = np.ones(ids.shape, dtype=bool)
    for sl in _chunks(len(ids), ids.shape[1]):
        a = ids[sl]
        earlier = np.tril(np.ones((a.shape[1], a.shape[1]), dtype=bool), -1)  # [j, l]: l < j
        first[sl] = ~((a[:, :, None] == a[:, None, :]) & earlier[None]).any(-1)
    return first


def _hit_credit_rows(sig: np.ndarray, ref: np.ndarray, ks: Sequence[int], ids: Optional[np.ndarray] = None) -> np.ndarray:
    """``(rows, len(ks))``: for each row (a set of runs, both sides oriented so that higher is
    better), the chance that the best-signal run is in the row's top ``k`` by the reference, ties
    broken at random in expectation (as :func:`top_k_hits`). ``ids`` ``(rows, L)``: which run each
    entry is (bootstrap copies of one run count once, and are never a tie with each other)."""
    return _hit_credit_masked(sig, ref, np.ones(sig.shape, dtype=bool), ks, ids)


def _group_codes(groups: Optional[Sequence[Any]], n: int) -> Optional[np.ndarray]:
    """Group labels -> integer codes ``0..G-1`` (in sorted order of the labels' strings); None stays None."""
    if groups is None:
        return None
    labels = [str(g) for g in groups]
    if len(labels) != n:
        raise SelectionError(f"Expected one group label per run ({n}), but got {len(labels)}.")
    uniq = sorted(set(labels))
    code = {g: i for i, g in enumerate(uniq)}
    return np.array([code[g] for g in labels], dtype=np.int64)


class _ClusterDraws(NamedTuple):
    """A cluster bootstrap's replicates, each ``(n_boot, L)`` with ``L`` the largest replicate's size."""

    #: the runs of each replicate
    idx: np.ndarray
    #: which draw (0..G-1) each entry came from (-1 in the padding)
    draw: np.ndarray
    #: which entries are real (the rest is padding)
    valid: np.ndarray


def _cluster_draws(codes: np.ndarray, n_boot: int, rng: np.random.Generator) -> _ClusterDraws:
    """A cluster bootstrap: each replicate draws the ``G`` groups with replacement
    (``rng.integers(0, G, size=(n_boot, G))``) and takes every run of each drawn group, in the
    order drawn (a group's runs in their order)."""
    n_groups = int(codes.max()) + 1
    members = [np.flatnonzero(codes == g) for g in range(n_groups)]
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    sizes = np.array([len(m) for m in members])
    lengths = sizes[draws].sum(1)
    width = int(lengths.max())
    idx = np.zeros((n_boot, width), dtype=np.int64)
    draw = np.full((n_boot, width), -1, dtype=np.int64)
    valid = np.zeros((n_boot, width), dtype=bool)
    for b in range(n_boot):
        parts = [members[g] for g in draws[b]]
        cat = np.concatenate(parts)
        idx[b, : len(cat)] = cat
        draw[b, : len(cat)] = np.repeat(np.arange(n_groups), [len(q) for q in parts])
        valid[b, : len(cat)] = True
    return _ClusterDraws(idx, draw, valid)


def _hit_credit_masked(sig: np.ndarray, ref: np.ndarray, valid: np.ndarray, ks: Sequence[int],
                       ids: Optional[np.ndarray] = None) -> np.ndarray:
    """As :func:`_hit_credit_rows` over each row's ``valid`` entries only; with ``ids``, each run
    counts once however many copies of it the row holds."""
    out = np.empty((len(sig), len(ks)))
    if ids is None:
        ids = np.broadcast_to(np.arange(sig.shape[1]), sig.shape)
    first = _first_copies(ids) & valid
    for sl in _chunks(len(sig), sig.shape[1]):
        s, r, v, f, a = sig[sl], ref[sl], valid[sl], first[sl], ids[sl]
        smax = np.where(v, s, -np.inf).max(1, keepdims=True)
        picks = f & (s == smax)  # the runs with the best signal, each once
        other = a[:, None, :] != a[:, :, None]  # [row, j, l]: l is another run than j
        better = ((r[:, None, :] > r[:, :, None]) & f[:, None, :]).sum(-1)  # distinct runs strictly better than j
        equal = ((r[:, None, :] == r[:, :, None]) & f[:, None, :] & other).sum(-1)  # distinct other runs tied with j
        for i, k in enumerate(ks):
            credit = np.clip((k - better) / (equal + 1.0), 0.0, 1.0)
            out[sl, i] = np.where(picks, credit, 0.0).sum(1) / picks.sum(1)
    return out


def _interval(values: np.ndarray, level: float) -> Optional[List[float]]:
    v = values[np.isfinite(values)]
    if not len(v):
        return None
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise SelectionError(f"Expected `level` to be a float in (0, 1) (e.g. 0.95 for 95 % intervals), but got {level!r}.")
    return float(level)


def _check_count(value: Any, name: str, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SelectionError(f"Expected `{name}` to be an int >= {minimum} ({what}), but got {value!r}.")
    return int(value)


class _Replicates(NamedTuple):
    """A bootstrap's correlations, one per replicate."""

    #: ``(n_boot,)`` Kendall's tau-b (NaN where undefined)
    kendall_tau: np.ndarray
    #: ``(n_boot,)`` Spearman's rho (NaN where undefined)
    spearman_rho: np.ndarray


def _replicates_over_runs(sig: np.ndarray, ref: np.ndarray, n_boot: int, rng: np.random.Generator) -> _Replicates:
    """The correlations of ``n_boot`` resamples of the runs (oriented ``sig``, ``ref``), as
    :func:`bootstrap_intervals` documents them."""
    n = len(sig)
    idx = rng.integers(0, n, size=(n_boot, n))
    bs, br = sig[idx], ref[idx]
    return _Replicates(_kendall_rows(bs, br), _spearman_rows(bs, br))


def _replicates_over_groups(sig: np.ndarray, ref: np.ndarray, codes: np.ndarray, n_boot: int,
                            rng: np.random.Generator) -> _Replicates:
    """The correlations of ``n_boot`` cluster-bootstrap replicates (the groups ``codes`` resampled,
    each with all its runs), as :func:`bootstrap_intervals` documents them."""
    idx, draw, valid = _cluster_draws(codes, n_boot, rng)
    bs, br = sig[idx], ref[idx]
    return _Replicates(_kendall_rows_grouped(bs, br, codes[idx], draw, valid), _spearman_rows_masked(bs, br, valid))


def bootstrap_intervals(
    signal: Sequence[float], reference: Sequence[float], *, mode: str = "max", reference_mode: str = "max",
    ks: Iterable[int] = (), subset_size: Optional[int] = None, n_boot: int = 1000, level: float = 0.95,
    n_draws: int = 10_000, seed: int = 0, groups: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
    """Percentile bootstrap intervals over runs (or over groups of runs) for Kendall's tau-b and
    Spearman's rho, and the hit rates' intervals of :func:`top_k_intervals`.

    Each of ``n_boot`` replicates resamples the ``n`` runs with replacement (``idx =
    np.random.default_rng(seed).integers(0, n, size=(n_boot, n))``, one row per replicate) and
    recomputes each correlation on the resampled runs, oriented by ``mode`` and ``reference_mode``
    so that agreement is positive. The interval is ``np.quantile`` of the replicates at
    ``(1 - level)/2`` and ``(1 + level)/2``; replicates where a correlation is undefined (a
    constant side) are left out and counted.

    The top-``k`` hit rates (``ks``, over subsets of ``subset_size`` runs, ``n_draws`` of them
    seeded with ``seed``) are not bootstrapped: a resample with replacement holds fewer distinct
    runs, among which any pick is more often in the top ``k``, so its interval could exclude the
    rate itself. Their intervals are :func:`top_k_intervals`' (a delete-one jackknife over the
    same subsets, or over the groups with ``groups``), undefined when ``subset_size`` is ``n``.

    **Groups** (``groups``: one label per run, e.g. the configuration, whose seeds are not
    independent runs): a cluster bootstrap. Each replicate draws the ``G`` groups with replacement
    (``rng.integers(0, G, size=(n_boot, G))``, the groups numbered in sorted order of their labels'
    strings) and takes every run of each drawn group, so a replicate has as many runs as its drawn
    groups hold. Kendall's tau-b of a replicate leaves out the pairs of runs of one group that come
    from two different draws of it (kept, each within-group pair would count once per pair of
    copies, over-weighting the seed-to-seed pairs and pulling tau toward the within-group
    agreement); Spearman's rho uses every run of the replicate.

    What it covers: how much the statistic would vary over other sweeps of ``n`` runs drawn like
    these from the same configurations (with ``groups``: of ``G`` groups drawn like these); not the
    uncertainty of how these runs were scored. Without ``groups``, runs that share a configuration
    are treated as independent and the intervals come out too narrow.

    Args:
        signal: ``(n,)`` the signal of each run.
        reference: ``(n,)`` the reference of each run (e.g. test accuracy).
        mode: ``"max"`` if a higher signal is better, else ``"min"``.
        reference_mode: likewise for the reference.
        ks: the ``k`` of the hit rates, each below the subset size.
        subset_size: runs per subset for the hit rates (default: all).
        n_boot: bootstrap replicates ``B``.
        level: the intervals' level (0.95: 2.5th to 97.5th percentile).
        n_draws: subsets drawn for the hit rates (as :func:`top_k_hits`).
        seed: seeds the numpy Generators.
        groups: ``(n,)`` a label per run (any hashable; compared as strings) for a cluster
            bootstrap over the groups, or None (the runs are resampled).

    Returns:
        ``{"kendall_tau": [lo, hi] or None, "spearman_rho": [lo, hi] or None, "top_k": {k: [lo, hi] or
        None}, "top_k_undefined": reason or None, "undefined": {"kendall_tau": count, "spearman_rho":
        count}, "n_boot", "level", "seed", "resampled": "runs" | "groups", "n_groups"}``.

    Example:
        >>> ci = bootstrap_intervals([0.9, 0.5, 0.7, 0.2], [0.95, 0.6, 0.9, 0.3], ks=[1], subset_size=3, n_boot=200)
        >>> ci["kendall_tau"][1], sorted(ci["top_k"])
        (1.0, [1])
        >>> ci = bootstrap_intervals([0.9, 0.8, 0.5, 0.4, 0.2, 0.1], [0.9, 0.95, 0.6, 0.5, 0.3, 0.2],
        ...                          groups=["a", "a", "b", "b", "c", "c"], n_boot=200)
        >>> ci["resampled"], ci["n_groups"]
        ('groups', 3)
    """
    _check_directions(mode, reference_mode)
    sig = np.asarray(signal, dtype=np.float64) * (1 if mode == "max" else -1)
    ref = np.asarray(reference, dtype=np.float64) * (1 if reference_mode == "max" else -1)
    if sig.ndim != 1 or sig.shape != ref.shape or len(sig) < 2:
        raise SelectionError(f"Expected `signal` and `reference` to be 1-D of the same length >= 2, but got shapes {sig.shape} and {ref.shape}.")
    if not (np.isfinite(sig).all() and np.isfinite(ref).all()):
        raise SelectionError("Expected `signal` and `reference` to be finite; drop the runs without a value first.")
    n = len(sig)
    n_boot = _check_count(n_boot, "n_boot", 1, "bootstrap replicates")
    level = _check_level(level)
    m = n if subset_size is None else int(subset_size)
    if not 1 <= m <= n:
        raise SelectionError(f"Expected `subset_size` in [1, {n}] (the number of runs), but got {subset_size}.")
    ks = sorted({int(k) for k in ks})
    codes = _group_codes(groups, n)
    hits = (top_k_intervals(sig, ref, ks, subset_size=m, n_draws=n_draws, seed=seed, level=level, groups=groups)
            if ks else {"interval": {}, "undefined": None})
    rng = np.random.default_rng(seed)
    if codes is None:
        reps = _replicates_over_runs(sig, ref, n_boot, rng)
    else:
        reps = _replicates_over_groups(sig, ref, codes, n_boot, rng)
    taus, rhos = reps.kendall_tau, reps.spearman_rho
    return {
        "kendall_tau": _interval(taus, level), "spearman_rho": _interval(rhos, level),
        "top_k": dict(hits["interval"]), "top_k_undefined": hits["undefined"],
        "undefined": {"kendall_tau": int((~np.isfinite(taus)).sum()), "spearman_rho": int((~np.isfinite(rhos)).sum())},
        "n_boot": n_boot, "level": level, "seed": seed,
        "resampled": "runs" if codes is None else "groups", "n_groups": None if codes is None else int(codes.max()) + 1,
    }


def tau_difference(
    signal_a: Sequence[float], signal_b: Sequence[float], reference: Sequence[float], *, mode_a: str = "max",
    mode_b: str = "max", reference_mode: str = "max", n_boot: int = 1000, level: float = 0.95, seed: int = 0,
    groups: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
    """Kendall's tau-b of signal A minus that of signal B (each oriented so that agreement with the
    reference is positive), with a **paired** percentile bootstrap interval: both taus are computed
    on the same resamples (the runs, or with ``groups`` the groups, drawn exactly as
    :func:`bootstrap_intervals` draws them with the same ``seed``: the replicates of each tau are
    those of its own interval over the same runs), and the interval is that of the replicate
    differences. Pass only the runs that have both signals.

    Args:
        signal_a: ``(n,)`` signal A of each run.
        signal_b: ``(n,)`` signal B of each run.
        reference: ``(n,)`` the reference (e.g. test accuracy).
        mode_a: ``"max"`` if a higher A is better, else ``"min"``; likewise ``mode_b``, ``reference_mode``.
        n_boot: bootstrap replicates (0: the point values only).
        level: the interval's level.
        seed: seeds the numpy Generator.
        groups: ``(n,)`` a label per run for a cluster bootstrap (see :func:`bootstrap_intervals`).

    Returns:
        ``{"difference", "interval": [lo, hi] or None, "kendall_tau_a", "kendall_tau_b", "n_runs",
        "undefined": replicates where a tau was undefined (left out), "n_boot", "level", "seed",
        "resampled": "runs" | "groups", "n_groups"}`` (``difference`` None when a tau is undefined).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ref = np.arange(20.0)
        >>> a, b = ref + rng.normal(0, 2, 20), rng.normal(size=20)  # A follows the reference, B is noise
        >>> d = tau_difference(a, b, ref, n_boot=200)
        >>> round(d["difference"], 2), d["interval"][0] > 0
        (0.73, True)
    """
    a = np.asarray(signal_a, dtype=np.float64) * (1 if mode_a == "max" else -1)
    b = np.asarray(signal_b, dtype=np.float64) * (1 if mode_b == "max" else -1)
    ref = np.asarray(reference, dtype=np.float64) * (1 if reference_mode == "max" else -1)
    if a.ndim != 1 or a.shape != b.shape or a.shape != ref.shape or len(a) < 2:
        raise SelectionError(f"Expected `signal_a`, `signal_b` and `reference` to be 1-D of the same length >= 2, but got shapes "
                             f"{a.shape}, {b.shape} and {ref.shape}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all() and np.isfinite(ref).all()):
        raise SelectionError("Expected finite values; pass only the runs that have both signals and the reference.")
    for name, md in (("mode_a", mode_a), ("mode_b", mode_b), ("reference_mode", reference_mode)):
        if md not in ("max", "min"):
            raise SelectionError(f"Expected `{name}` to be 'max' or 'min', but got {md!r}.")
    n = len(a)
    n_boot = _check_count(n_boot, "n_boot", 0, "bootstrap replicates; 0 for none")
    level = _check_level(level)
    codes = _group_codes(groups, n)
    ta, tb = kendall_tau(a, ref), kendall_tau(b, ref)
    out: Dict[str, Any] = {
        "difference": None if np.isnan(ta) or np.isnan(tb) else float(ta - tb),
        "kendall_tau_a": None if np.isnan(ta) else ta, "kendall_tau_b": None if np.isnan(tb) else tb,
        "n_runs": n, "interval": None, "undefined": 0, "n_boot": n_boot, "level": level, "seed": seed,
        "resampled": "runs" if codes is None else "groups", "n_groups": None if codes is None else int(codes.max()) + 1,
    }
    if n_boot == 0:
        return out
    rng = np.random.default_rng(seed)
    if codes is None:
        idx = rng.integers(0, n, size=(n_boot, n))
        diff = _kendall_rows(a[idx], ref[idx]) - _kendall_rows(b[idx], ref[idx])
    else:
        idx, draw, valid = _cluster_draws(codes, n_boot, rng)
        diff = (_kendall_rows_grouped(a[idx], ref[idx], codes[idx], draw, valid)
                - _kendall_rows_grouped(b[idx], ref[idx], codes[idx], draw, valid))
    out["interval"], out["undefined"] = _interval(diff, level), int((~np.isfinite(diff)).sum())
    return out


class _CvInputs(NamedTuple):
    """What :func:`cross_validate_choice` chooses among, as float64 arrays of one value per run."""

    names: List[str]
    values: List[np.ndarray]
    base_names: List[str]
    base_values: List[np.ndarray]
    reference: np.ndarray


def _cv_inputs(signals: Mapping[str, Sequence[float]], reference: Sequence[float],
               baselines: Optional[Mapping[str, Sequence[float]]]) -> _CvInputs:
    """The signals, baselines and reference as arrays, refused unless there is a signal and every
    array has one value per run."""
    names = list(signals)
    if not names:
        raise SelectionError("Expected at least one signal to choose from, but got none.")
    ref = np.asarray(reference, dtype=np.float64)
    vals = [np.asarray(signals[s], dtype=np.float64) for s in names]
    base_names = list(baselines or {})
    base_vals = [np.asarray(baselines[s], dtype=np.float64) for s in base_names]  # type: ignore[index]
    n = len(ref)
    if any(v.shape != (n,) for v in vals + base_vals):
        raise SelectionError(f"Expected every signal to have one value per run ({n}), but got shapes {[v.shape for v in vals + base_vals]}.")
    return _CvInputs(names, vals, base_names, base_vals, ref)


def _split_halves(n: int, codes: Optional[np.ndarray], n_groups: Optional[int],
                  rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One random split: ``(the choosing half, the held-out half)`` as sorted run indices; the runs
    (``rng.permutation(n)``, the first ``n // 2`` choose), or with ``codes`` the groups
    (``rng.permutation(G)``, the runs of the first ``G // 2`` choose)."""
    if codes is None:
        perm = rng.permutation(n)
        return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
    gperm = rng.permutation(n_groups)
    choose = np.isin(codes, gperm[: n_groups // 2])  # type: ignore[operator]
    return np.flatnonzero(choose), np.flatnonzero(~choose)


def _tau_on(v: np.ndarray, ref: np.ndarray, half: np.ndarray, min_runs: int) -> float:
    """Kendall's tau of ``v`` and ``ref`` over the runs of ``half`` that have ``v`` (NaN below ``min_runs``)."""
    keep = half[np.isfinite(v[half])]
    return kendall_tau(v[keep], ref[keep]) if len(keep) >= min_runs else float("nan")


@dataclass
class _CvTally:
    """The held-out results of :func:`cross_validate_choice`, split after split."""

    #: signal -> how many splits chose it
    chosen: Dict[str, int]
    #: the chosen signal's held-out tau, per split that chose one
    taus: List[float] = field(default_factory=list)
    #: k -> the chosen signal's held-out hit credit, per split where k is below its held-out runs
    hits: Dict[int, List[float]] = field(default_factory=dict)
    #: k -> a random pick's k / m on those splits
    rand: Dict[int, List[float]] = field(default_factory=dict)
    #: baseline -> its held-out tau, per split that chose a signal
    base: Dict[str, List[float]] = field(default_factory=dict)
    #: (the chosen signal or None, its held-out tau) per split
    per_split: List[Tuple[Optional[str], float]] = field(default_factory=list)

    @classmethod
    def empty(cls, data: _CvInputs, ks: Sequence[int]) -> "_CvTally":
        return cls({s: 0 for s in data.names}, hits={k: [] for k in ks}, rand={k: [] for k in ks},
                   base={s: [] for s in data.base_names})

    def add_split(self, data: _CvInputs, choose: np.ndarray, held_out: np.ndarray, ks: Sequence[int], min_runs: int) -> None:
        """Choose the signal with the best tau on ``choose`` (the first on a tie) and record how it
        and the baselines do on ``held_out``; a split on which no signal has a tau records ``(None, NaN)``."""
        ref = data.reference
        scores = np.array([_tau_on(v, ref, choose, min_runs) for v in data.values])
        if not np.isfinite(scores).any():
            self.per_split.append((None, float("nan")))
            return
        best = int(np.nanargmax(scores))  # the first of the best
        self.chosen[data.names[best]] += 1
        v = data.values[best]
        t = _tau_on(v, ref, held_out, min_runs)
        self.per_split.append((data.names[best], t))
        self.taus.append(t)
        keep = held_out[np.isfinite(v[held_out])]
        for k in ks:
            if k < len(keep):
                self.hits[k].append(float(_hit_credit_rows(v[keep][None], ref[keep][None], [k])[0, 0]))
                self.rand[k].append(k / len(keep))
        for s, bv in zip(data.base_names, data.base_values):
            self.base[s].append(_tau_on(bv, ref, held_out, min_runs))


def _spread(xs: List[float], level: float) -> Dict[str, Any]:
    """``{"mean", "interval", "n"}`` of the finite values of ``xs`` (mean None when there are none)."""
    arr = np.asarray(xs, dtype=np.float64)
    fin = arr[np.isfinite(arr)]
    return {"mean": float(fin.mean()) if len(fin) else None, "interval": _interval(arr, level), "n": int(len(fin))}


def cross_validate_choice(
    signals: Mapping[str, Sequence[float]], reference: Sequence[float], *, ks: Iterable[int] = (), n_splits: int = 200,
    level: float = 0.95, seed: int = 0, baselines: Optional[Mapping[str, Sequence[float]]] = None, min_runs: int = 3,
    groups: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
    """How well the signal that looks best on some runs does on the others.

    Choosing the signal with the best Kendall tau on the same runs it is then judged on overfits
    (with many signals, one correlates by chance). Here, ``n_splits`` times: shuffle the ``n`` runs
    (``perm = rng.permutation(n)`` with ``rng = np.random.default_rng([seed, 1])``, split after split),
    take ``perm[:n // 2]`` as the choosing half and the rest as the held-out half; choose the signal
    with the best tau on the choosing half (the first in ``signals``' order on a tie; a signal
    counts on a half where at least ``min_runs`` runs have it), and report its tau and its top-k
    hit on the held-out half (the pick among the held-out runs that have it, ties broken at random in
    expectation; only for ``k`` below their number), beside a random pick's ``k / m``. A split on
    which no signal has a tau is left out. ``baselines`` (e.g. the training loss) are not chosen
    from; their held-out tau on the same halves is reported beside.

    With ``groups`` (a label per run, e.g. the configuration) the *groups* are split instead: ``perm
    = rng.permutation(G)`` over the groups numbered in sorted order of their labels' strings, the
    runs of groups ``perm[:G // 2]`` choose and the runs of the others are held out, so no group has
    runs on both sides (seeds of one configuration on both sides would let the choice see the
    held-out configurations). Needs at least 4 groups.

    Args:
        signals: name -> ``(n,)`` values oriented so that higher is better; NaN = the run lacks it.
        reference: ``(n,)`` reference values, oriented so that higher is better.
        ks: the ``k`` of the held-out hit rates.
        n_splits: random half splits ``R``.
        level: the level of the spread reported over splits (percentiles of the held-out values:
            the halves overlap from split to split, so it is a spread, not a confidence interval).
        seed: seeds the numpy Generator (``default_rng([seed, 1])``).
        baselines: name -> ``(n,)`` oriented values, reported but never chosen.
        min_runs: the fewest runs with a value for a tau on a half.
        groups: ``(n,)`` a label per run: split the groups, not the runs (None: the runs).

    Returns:
        ``{"n_splits", "used", "chosen": {name: count}, "heldout_tau": {"mean", "interval", "n"},
        "heldout_top_k": {k: {"mean", "interval", "n", "random"}}, "baselines": {name: {"mean", "interval", "n"}},
        "level", "seed", "per_split": [(chosen, tau) ...], "split": "runs" | "groups", "n_groups"}``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ref = rng.normal(size=12)
        >>> cv = cross_validate_choice({"good": ref + 0.1 * rng.normal(size=12), "noise": rng.normal(size=12)}, ref, n_splits=50)
        >>> cv["chosen"]["good"] > cv["chosen"]["noise"], cv["heldout_tau"]["mean"] > 0.5
        (True, True)
    """
    data = _cv_inputs(signals, reference, baselines)
    n = len(data.reference)
    n_splits = _check_count(n_splits, "n_splits", 1, "random half splits")
    level = _check_level(level)
    if n // 2 < min_runs:
        raise SelectionError(f"Expected at least {2 * min_runs} runs to split in halves of {min_runs} or more, but got {_plural(n, 'run')}.")
    codes = _group_codes(groups, n)
    n_groups = None if codes is None else int(codes.max()) + 1
    if n_groups is not None and n_groups < 4:
        raise SelectionError(f"Expected at least 4 groups to split in halves of 2 or more, but got {_plural(n_groups, 'group')}. "
                             "Group the runs more finely, or split the runs (groups=None).")
    ks = sorted({int(k) for k in ks})
    rng = np.random.default_rng([seed, 1])
    tally = _CvTally.empty(data, ks)
    for _ in range(n_splits):
        choose, held_out = _split_halves(n, codes, n_groups, rng)
        tally.add_split(data, choose, held_out, ks, min_runs)
    return {
        "n_splits": n_splits, "used": sum(tally.chosen.values()), "chosen": tally.chosen, "heldout_tau": _spread(tally.taus, level),
        "heldout_top_k": {k: {**_spread(tally.hits[k], level), "random": float(np.mean(tally.rand[k])) if tally.rand[k] else None}
                          for k in ks},
        "baselines": {s: _spread(tally.base[s], level) for s in data.base_names}, "level": level, "seed": seed,
        "per_split": tally.per_split, "split": "runs" if codes is None else "groups", "n_groups": n_groups,
    }
