"""The statistics helpers of examples/hparam_selection.py, checked against independent implementations
written here: Kendall's tau-b (scipy, with ties), tau-b over a subset of pairs (a plain double loop),
the configuration (cluster) bootstrap replicate by replicate (a plain loop with the same generator),
the verdict / margin logic, and the configuration-level cross-validated choice (half splits of the
configurations: no configuration on both sides). Fast: no training."""

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from reference_rank import tau_b_pairs_loop

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def mod():
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location("_example_hparam_selection", EXAMPLES / "hparam_selection.py")
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        return m
    finally:
        sys.path.remove(str(EXAMPLES))


def _tied(rng, n):
    """Values with many ties (a few levels), as accuracies on a small set have."""
    return rng.integers(0, 4, n).astype(float), rng.integers(0, 5, n).astype(float)


@pytest.mark.parametrize("seed", range(8))
def test_tau_on_and_tau_b_pairs_match_scipy_with_ties(mod, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 30))
    x, y = _tied(rng, n)
    ref = stats.kendalltau(x, y, variant="b").statistic
    all_pairs = np.triu(np.ones((n, n), bool), 1)
    assert mod.tau_b_pairs(x, y, all_pairs) == pytest.approx(ref, abs=1e-12)
    assert mod.tau_on(x, y) == pytest.approx(ref, abs=1e-12)
    # continuous values with NaN: tau_on drops the runs that lack either value
    xc, yc = rng.normal(size=n), rng.normal(size=n)
    xc[rng.random(n) < 0.2] = np.nan
    ok = np.isfinite(xc)
    assert mod.tau_on(xc, yc) == pytest.approx(stats.kendalltau(xc[ok], yc[ok]).statistic, abs=1e-12)


def test_tau_b_pairs_on_a_subset_of_pairs_and_degenerate_cases(mod):
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(4, 15))
        x, y = _tied(rng, n)
        keep = np.triu(rng.random((n, n)) < 0.6, 1)
        got = mod.tau_b_pairs(x, y, keep)
        ref = tau_b_pairs_loop(x, y, lambda i, j: keep[i, j])
        assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref, abs=1e-12)
    const = np.ones(6)
    assert math.isnan(mod.tau_b_pairs(const, np.arange(6.0), np.triu(np.ones((6, 6), bool), 1)))
    assert math.isnan(mod.tau_on(const, np.arange(6.0)))  # a constant signal has no ranking
    assert math.isnan(mod.tau_on(np.arange(2.0), np.arange(2.0)))  # fewer than 3 runs


def _loop_cluster_bootstrap(sig, ref, clusters, n_boot, seed):
    """The configuration bootstrap written as a plain loop: the same generator draws the same
    configurations; the resample lists each drawn configuration's runs, draw after draw; tau-b over
    its pairs except those of two different draws of one configuration (double loop)."""
    ids = sorted(set(clusters.tolist()))
    rng = np.random.default_rng(seed)
    out = {s: [] for s in sig}
    for _ in range(n_boot):
        draws = rng.integers(0, len(ids), len(ids))
        rows = []  # (run index, draw number)
        for d, j in enumerate(draws):
            rows += [(i, d) for i in range(len(clusters)) if clusters[i] == ids[j]]
        for s, v in sig.items():
            kept = [(i, d) for i, d in rows if np.isfinite(v[i]) and np.isfinite(ref[i])]
            if len(kept) < 3:
                out[s].append(math.nan)
                continue
            x = np.array([v[i] for i, _ in kept])
            y = np.array([ref[i] for i, _ in kept])

            def keep(a, b):
                (ia, da), (ib, db) = kept[a], kept[b]
                return not (clusters[ia] == clusters[ib] and da != db)

            out[s].append(tau_b_pairs_loop(x, y, keep))
    return {s: np.array(v) for s, v in out.items()}


def test_cluster_bootstrap_replicate_by_replicate_against_a_plain_loop(mod):
    rng = np.random.default_rng(11)
    n_cfg, n_seeds = 7, 3
    clusters = np.repeat(np.arange(n_cfg) * 3 + 2, n_seeds)  # labels need not be 0..C-1
    level = rng.normal(size=n_cfg).repeat(n_seeds)
    ref = np.round(level + 0.3 * rng.normal(size=len(clusters)), 1)  # rounded: ties
    sig = {"a": np.round(level + rng.normal(size=len(clusters)), 1),
           "b": -ref + 0.5 * rng.normal(size=len(clusters)),
           "holes": np.where(rng.random(len(clusters)) < 0.3, np.nan, level)}  # a layer some runs lack
    got = mod.cluster_bootstrap(sig, ref, clusters, n_boot=40, seed=3)
    want = _loop_cluster_bootstrap(sig, ref, clusters, 40, 3)
    for s in sig:
        np.testing.assert_allclose(got[s], want[s], atol=1e-12, equal_nan=True)
    # the same replicate for every signal: the paired difference is the difference of the replicates
    other = mod.cluster_bootstrap({"a": sig["a"]}, ref, clusters, n_boot=40, seed=3)["a"]
    np.testing.assert_array_equal(other, got["a"])
    assert not np.array_equal(mod.cluster_bootstrap({"a": sig["a"]}, ref, clusters, n_boot=40, seed=4)["a"], got["a"])


def test_cluster_bootstrap_with_one_run_per_cluster_is_the_ordinary_bootstrap(mod):
    """One run per configuration: every pair of distinct runs counts, with the multiplicity of
    their draws; only the pair of two copies of one run is left out."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=12), rng.normal(size=12)
    got = mod.cluster_bootstrap({"x": x}, y, np.arange(12), n_boot=30, seed=0)["x"]
    r = np.random.default_rng(0)
    for b in range(30):
        idx = r.integers(0, 12, 12)
        # a run drawn twice: the pair of its copies is left out (same cluster, two draws)
        want = tau_b_pairs_loop(x[idx], y[idx], lambda i, j: idx[i] != idx[j])
        assert got[b] == pytest.approx(want, abs=1e-12), b


def test_interval_and_config_means(mod):
    d = np.r_[np.linspace(-1, 1, 101), np.nan, np.nan]
    lo, hi = mod.interval(d)
    assert (lo, hi) == pytest.approx((np.quantile(d[:101], 0.025), np.quantile(d[:101], 0.975)))
    assert all(map(math.isnan, mod.interval(np.r_[np.ones(9), np.full(50, np.nan)])))  # < 10 finite draws
    configs = np.array([4, 4, 1, 1, 1, 9])
    ref = np.array([0.5, 0.7, 0.1, 0.2, 0.3, 0.9])
    v = np.array([1.0, np.nan, 2.0, 4.0, np.nan, np.nan])
    ids, cref, csig = mod.config_means({"v": v}, ref, configs)
    np.testing.assert_array_equal(ids, [1, 4, 9])
    np.testing.assert_allclose(cref, [0.2, 0.6, 0.9])
    np.testing.assert_allclose(csig["v"], [3.0, 1.0, np.nan])  # a configuration none of whose seeds has it: NaN


def test_verdicts_and_margin(mod):
    m = mod.MARGIN
    assert m == 0.02
    assert "agrees with test accuracy" in mod.verdict_sign("s", (m + 0.001, 0.5), 24)
    assert "not resolved with 24 runs" in mod.verdict_sign("s", (m - 0.001, 0.5), 24)  # above 0, not by the margin
    assert "not resolved" in mod.verdict_sign("s", (0.0, 0.5), 24)
    assert "WRONG way" in mod.verdict_sign("s", (-0.5, -m - 0.001), 24)
    assert "not resolved" in mod.verdict_sign("s", (-0.5, -m + 0.001), 24)
    assert "not resolved" in mod.verdict_sign("s", (math.nan, math.nan), 24)
    assert mod.verdict_diff("a", "b", (0.03, 0.4), 10).startswith("a ranks better than b")
    assert mod.verdict_diff("a", "b", (-0.4, -0.03), 10).startswith("b ranks better than a")
    assert mod.verdict_diff("a", "b", (0.01, 0.4), 10) == "a vs b: not resolved with 10 runs (tau difference [+0.01, +0.40])"
    assert "not resolved" in mod.verdict_diff("a", "b", (math.nan, math.nan), 10)
    assert mod.fmt_ci((math.nan, 1.0)) == "[   -,    -]"


def test_configuration_level_cv_splits_configurations(mod):
    """The example's cross-validated choice runs on the configuration means (``config_means``): each
    half split is a split of the configurations. Checked split by split against a plain
    implementation: choose on one half of the configurations by scipy's tau-b, judge on the other."""
    from netprobe.select import cross_validate_choice

    rng = np.random.default_rng(7)
    n_cfg, n_seeds = 10, 3
    configs = np.repeat(np.arange(n_cfg), n_seeds)
    level = rng.normal(size=n_cfg).repeat(n_seeds)
    ref = level + 0.3 * rng.normal(size=len(configs))
    osig = {"good": level + 0.5 * rng.normal(size=len(configs)), "noise": rng.normal(size=len(configs))}
    ids, cref, csig = mod.config_means(osig, ref, configs)
    assert len(cref) == n_cfg  # one value per configuration: a split cannot put one configuration on both sides
    cv = cross_validate_choice(csig, cref, n_splits=25, seed=3)
    r = np.random.default_rng([3, 1])
    for chosen, tau in cv["per_split"]:
        perm = r.permutation(n_cfg)
        a, b = perm[: n_cfg // 2], perm[n_cfg // 2:]
        assert not set(ids[a]) & set(ids[b])
        taus = {s: stats.kendalltau(v[a], cref[a]).statistic for s, v in csig.items()}
        best = max(taus, key=lambda s: (taus[s], -list(csig).index(s)))
        assert chosen == best
        assert tau == pytest.approx(stats.kendalltau(csig[best][b], cref[b]).statistic, abs=1e-12)


def test_seed_offset_shifts_configurations_and_seeds(mod):
    grid = mod.GRID
    assert mod.sample_configs(24, grid) == mod.sample_configs(24, grid, seed=0)  # the default run is unchanged
    assert mod.sample_configs(12, grid, seed=1) != mod.sample_configs(12, grid, seed=0)
    assert mod.run_seeds(3) == [0, 1, 2] and mod.run_seeds(2, 2) == [200, 201]
    names = {mod.run_name(ci, c, s) for (ci, c), s in itertools.product(enumerate(mod.sample_configs(5, grid)), (0, 1))}
    assert len(names) == 10
