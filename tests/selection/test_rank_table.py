"""`netprobe rank` as a multi-signal table: correlations against scipy, bootstrap intervals and the
cross-validated choice against plain-loop references written here, random baselines, refusals,
orientation, plurals, underfit flags and the deepest layer, on event files written here."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from netprobe.cli import main
from netprobe.select import (
    Run, SelectionError, bootstrap_intervals, cross_validate_choice, group_labels, key_direction, layer_order, load_run,
    parse_signal, rank_runs, rank_signals, tau_difference, top_k_hits, top_k_intervals,
)
from reference_rank import jackknife_hit_rates, tau_b_pairs_loop


def f32(x):
    """The value an event file stores (float32), as a Python float."""
    return float(np.float32(x))


# ----------------------------------------------------------------------------- references (plain loops)
def ref_tau(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.kendalltau(x, y).statistic)


def ref_rho(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(x, y).statistic)


def ref_hit(sig, ref, k, ids=None):
    """Chance that the best-signal run is in the top k by the reference (both higher = better):
    a tie for the best signal averages over the tied runs; a run with `better` runs strictly above it
    and `equal` others tied with it is in the top k with probability clip((k - better) / (equal + 1)).
    `ids`: which run each entry is; copies of one run (a bootstrap draws with replacement) are one run."""
    if ids is not None:
        seen, keep = set(), []
        for j, i in enumerate(ids):
            if i not in seen:
                seen.add(i)
                keep.append(j)
        sig, ref = [sig[j] for j in keep], [ref[j] for j in keep]
    n = len(sig)
    best = max(sig)
    picks = [i for i in range(n) if sig[i] == best]
    total = 0.0
    for p in picks:
        better = sum(1 for j in range(n) if ref[j] > ref[p])
        equal = sum(1 for j in range(n) if j != p and ref[j] == ref[p])
        total += min(1.0, max(0.0, (k - better) / (equal + 1)))
    return total / len(picks)


def ref_percentile(values, level):
    v = [x for x in values if not math.isnan(x)]
    return [float(np.quantile(v, (1 - level) / 2)), float(np.quantile(v, (1 + level) / 2))]


def ref_bootstrap(sig, ref, *, n_boot, level, seed):
    """The documented bootstrap of the correlations, replicate by replicate: resample runs with
    replacement, recompute."""
    n = len(sig)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    taus, rhos = [], []
    for b in range(n_boot):
        s = [sig[i] for i in idx[b]]
        r = [ref[i] for i in idx[b]]
        taus.append(ref_tau(s, r))
        rhos.append(ref_rho(s, r))
    return {"kendall_tau": ref_percentile(taus, level), "spearman_rho": ref_percentile(rhos, level)}


def ref_cv(signals, ref, ks, n_splits, seed, level, min_runs=3):
    names = list(signals)
    n = len(ref)
    rng = np.random.default_rng([seed, 1])
    chosen = {s: 0 for s in names}
    taus, hits, rand = [], {k: [] for k in ks}, {k: [] for k in ks}

    def tau_on(v, half):
        keep = [i for i in half if not math.isnan(v[i])]
        if len(keep) < min_runs:
            return float("nan")
        return ref_tau([v[i] for i in keep], [ref[i] for i in keep])

    for _ in range(n_splits):
        perm = rng.permutation(n)
        a, b = sorted(perm[: n // 2]), sorted(perm[n // 2:])
        best, best_tau = None, -math.inf
        for s in names:
            t = tau_on(signals[s], a)
            if not math.isnan(t) and t > best_tau:
                best, best_tau = s, t
        if best is None:
            continue
        chosen[best] += 1
        v = signals[best]
        taus.append(tau_on(v, b))
        keep = [i for i in b if not math.isnan(v[i])]
        for k in ks:
            if k < len(keep):
                hits[k].append(ref_hit([v[i] for i in keep], [ref[i] for i in keep], k))
                rand[k].append(k / len(keep))
    return chosen, taus, hits, rand


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("seed", [0, 3])
def test_bootstrap_intervals_match_a_plain_loop_bootstrap(seed):
    rng = np.random.default_rng(100 + seed)
    sig = list(np.round(rng.normal(size=9), 1))  # ties
    ref = list(np.round(np.array(sig) + rng.normal(size=9), 1))
    got = bootstrap_intervals(sig, ref, ks=[1, 3], n_boot=300, level=0.9, seed=seed)
    want = ref_bootstrap(sig, ref, n_boot=300, level=0.9, seed=seed)
    assert got["kendall_tau"] == pytest.approx(want["kendall_tau"], abs=1e-9)
    assert got["spearman_rho"] == pytest.approx(want["spearman_rho"], abs=1e-9)
    # over all runs a hit rate is one pick's 0/1 outcome: no interval, and the reason
    assert got["top_k"] == {1: None, 3: None} and "one pick's outcome" in got["top_k_undefined"]
    assert got["n_boot"] == 300 and got["level"] == 0.9


def test_bootstrap_intervals_with_subsets_and_orientation():
    rng = np.random.default_rng(7)
    sig = list(rng.normal(size=8))
    loss = list(-np.array(sig) + 0.5 * rng.normal(size=8))  # lower loss = better, agrees with the signal
    got = bootstrap_intervals(sig, loss, reference_mode="min", ks=[1, 2], subset_size=4, n_boot=60, n_draws=300, seed=5)
    want = ref_bootstrap(sig, [-x for x in loss], n_boot=60, level=0.95, seed=5)
    hits = jackknife_hit_rates(ref_hit, sig, [-x for x in loss], [1, 2], subset_size=4, n_draws=300, seed=5, level=0.95)
    assert got["kendall_tau"] == pytest.approx(want["kendall_tau"], abs=1e-9)
    assert got["top_k"][2] == pytest.approx(hits[2][1], abs=1e-9)
    assert got["kendall_tau"][1] > 0  # oriented: agreement is positive
    with pytest.raises(SelectionError, match="level"):
        bootstrap_intervals(sig, loss, level=95)
    with pytest.raises(SelectionError, match="n_boot"):
        bootstrap_intervals(sig, loss, n_boot=0)
    with pytest.raises(SelectionError, match="finite"):
        bootstrap_intervals([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0])


def test_cross_validated_choice_matches_a_plain_loop_reference():
    rng = np.random.default_rng(11)
    n = 14
    ref = rng.normal(size=n)
    good = ref + 0.5 * rng.normal(size=n)
    noise = rng.normal(size=n)
    sparse = ref + 0.1 * rng.normal(size=n)
    sparse[[1, 4, 6, 9, 12]] = np.nan  # missing in some runs
    const = np.zeros(n)  # never has a tau
    signals = {"good": good, "noise": noise, "sparse": sparse, "const": const}
    base = {"loss": ref + rng.normal(size=n)}
    got = cross_validate_choice(signals, ref, ks=[1, 3, 7], n_splits=60, level=0.9, seed=2, baselines=base)
    chosen, taus, hits, rand = ref_cv({k: list(v) for k, v in signals.items()}, list(ref), [1, 3, 7], 60, 2, 0.9)
    assert got["chosen"] == chosen and got["used"] == sum(chosen.values()) == 60 and got["chosen"]["const"] == 0
    assert got["heldout_tau"]["mean"] == pytest.approx(np.nanmean(taus), abs=1e-12)
    assert got["heldout_tau"]["interval"] == pytest.approx(ref_percentile(taus, 0.9), abs=1e-12)
    for k in (1, 3):
        assert got["heldout_top_k"][k]["mean"] == pytest.approx(np.mean(hits[k]), abs=1e-12)
        assert got["heldout_top_k"][k]["random"] == pytest.approx(np.mean(rand[k]), abs=1e-12)
        assert got["heldout_top_k"][k]["n"] == len(hits[k])
    assert got["heldout_top_k"][7]["n"] == 0  # 7 runs per held-out half: k=7 is no test
    assert got["baselines"]["loss"]["n"] == 60
    with pytest.raises(SelectionError, match="at least 6 runs"):
        cross_validate_choice({"a": ref[:5]}, ref[:5])


def test_key_directions_and_signal_specs():
    assert [key_direction(k) for k in ("netprobe/reliance_auc", "netprobe/noise_auc/fc1", "netprobe/cka_prev/x",
                                       "netprobe/pwcca_ref", "netprobe/reliance_area", "netprobe/probe_accuracy",
                                       "netprobe/mutual_info_mean/l")] == ["max"] * 7
    assert key_direction("netprobe/selectivity_mean/fc1") == "min" and key_direction("netprobe/dead_fraction") == "min"
    assert key_direction("netprobe/time/RelianceMonitor") is None
    # other keys: a word 'loss' is lower-is-better, 'acc'/'accuracy' higher; anything else unknown
    assert [key_direction(k) for k in ("train/loss", "val_loss_epoch", "test/acc", "val_accuracy", "lr-Adam",
                                       "grad_accum", "loss_over_acc")] == ["min", "min", "max", "max", None, None, None]
    assert key_direction("netprobe/new_metric") is None and key_direction("netprobe/reliance_auc@deepest") == "max"
    assert key_direction("netprobe/best/reliance_area") == "max" and key_direction("netprobe/best/new_metric") is None
    assert parse_signal(" train/loss:min ") == ("train/loss", "min")
    assert parse_signal("netprobe/cka_prev@encoder.0:max") == ("netprobe/cka_prev@encoder.0", "max")
    with pytest.raises(SelectionError, match="layer alias"):
        parse_signal("netprobe/reliance_auc/fc1@deepest")
    with pytest.raises(SelectionError, match="layer alias"):
        parse_signal("train/loss@deepest")


# ----------------------------------------------------------------------------- a sweep on disk
N_RUNS = 10
LAYERS = ("fc1", "fc2", "fc10")  # in forward order (netprobe/layer_index): the deepest is fc10 (by name it would sort before fc2)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(0)
    data = {}
    for i in range(N_RUNS):
        name = f"r{i:02d}"
        acc = f32(0.80 + 0.015 * i + 0.01 * rng.random())
        v = {
            "test/acc": acc,
            "test/loss": f32(1 - acc + 0.02 * rng.normal()),
            "train/loss": f32(1 - acc + 0.05 * rng.normal()),
            "netprobe/reliance_auc/fc1": f32(acc + 0.05 * rng.normal()),
            "netprobe/reliance_auc/fc2": f32(rng.random()),
            "netprobe/reliance_auc/fc10": f32(acc + 0.01 * rng.normal()),
            "netprobe/dead_fraction": f32(round(0.5 - 2 * (acc - 0.8) + 0.2 * rng.random(), 1)),  # lower = better; ties
            "netprobe/probe_accuracy": f32(0.40 if i == 6 else 0.98 + 0.002 * i),
            "netprobe/new_metric": f32(rng.random()),
        }
        v["netprobe/reliance_auc"] = f32(np.mean([v[f"netprobe/reliance_auc/{layer}"] for layer in LAYERS]))
        data[name] = v
        with SummaryWriter(str(root / name)) as w:
            for step in (10, 20):
                for layer in LAYERS:
                    w.add_scalar(f"netprobe/reliance_auc/{layer}", v[f"netprobe/reliance_auc/{layer}"] - (0.1 if step == 10 else 0), step)
                for key in ("netprobe/reliance_auc", "netprobe/dead_fraction", "netprobe/probe_accuracy", "netprobe/new_metric"):
                    w.add_scalar(key, v[key] - (0.1 if step == 10 and key == "netprobe/reliance_auc" else 0), step)
                w.add_scalar("netprobe/time/RelianceMonitor", 0.01, step)
                w.add_scalar("netprobe/best/probe_accuracy", v["netprobe/probe_accuracy"], step)  # the monitors' best so far
                w.add_scalar("epoch", step // 10 - 1, step)
            for index, layer in enumerate(LAYERS):
                w.add_scalar(f"netprobe/layer_index/{layer}", float(index), 0)
            for key in ("train/loss", "test/acc", "test/loss"):
                w.add_scalar(key, v[key], 30)
    return root, data


def values(data, key, sign=1.0):
    names = sorted(data)
    return [sign * data[n][key] for n in names]


def row_of(res, signal):
    return next(r for r in res["signals"] if r["signal"] == signal)


def test_table_statistics_against_scipy_and_the_bootstrap(sweep):
    root, data = sweep
    res = rank_signals(root, "test/acc", signals=["all"], baselines=["train/loss:min"], n_boot=200, level=0.9, cv=0, seed=4)
    got = {r["signal"]: r for r in res["signals"]}
    assert set(got) == {"netprobe/reliance_auc", "netprobe/dead_fraction", "netprobe/probe_accuracy", "netprobe/reliance_auc@deepest",
                        *(f"netprobe/reliance_auc/{layer}" for layer in LAYERS), "train/loss", "netprobe/best/probe_accuracy"}
    assert got["train/loss"]["kind"] == "baseline" and got["netprobe/dead_fraction"]["mode"] == "min"
    assert res["not_evaluated"] == [{"signal": "netprobe/new_metric", "reason": "direction unknown (name it KEY:min or KEY:max)"}]
    acc = values(data, "test/acc")
    for key, sign in [("netprobe/reliance_auc/fc1", 1), ("netprobe/dead_fraction", -1), ("train/loss", -1)]:
        sig = values(data, key, sign)
        row = got[key]
        assert row["n_runs"] == N_RUNS
        assert row["kendall_tau"] == pytest.approx(ref_tau(sig, acc), abs=1e-9)
        assert row["spearman_rho"] == pytest.approx(ref_rho(sig, acc), abs=1e-9)
        want = ref_bootstrap(sig, acc, n_boot=200, level=0.9, seed=4)
        assert row["kendall_tau_ci"] == pytest.approx(want["kendall_tau"], abs=1e-9)
        assert row["spearman_rho_ci"] == pytest.approx(want["spearman_rho"], abs=1e-9)
        for k in res["ks"]:
            assert row["top_k"][str(k)] == pytest.approx(ref_hit(sig, acc, k))
            assert row["top_k_ci"][str(k)] is None  # one pick among all the runs: no interval
            assert row["top_k_random"][str(k)] == pytest.approx(k / N_RUNS)
        assert "one pick's outcome" in row["top_k_ci_undefined"]
        best = max(sig)
        ties = [n for n, s in zip(sorted(data), sig) if s == best]
        assert row["pick"] == ties[0] and row["pick_ties"] == ties
        ranks = stats.rankdata([-a for a in acc])
        assert row["pick_reference_rank"] == pytest.approx(np.mean([r for r, s in zip(ranks, sig) if s == best]))
    assert res["ks"] == [1, 5] and res["bootstrap"]["n_boot"] == 200
    # the deepest layer of every run is fc10 (by netprobe/layer_index), not fc2 (last by name)
    assert got["netprobe/reliance_auc@deepest"]["kendall_tau"] == got["netprobe/reliance_auc/fc10"]["kendall_tau"]
    assert set(got["netprobe/reliance_auc@deepest"]["keys"].values()) == {"netprobe/reliance_auc/fc10"}
    assert got["netprobe/reliance_auc@deepest"]["layer_source"] == ["layer_index"]


def test_orientation_with_against_mode_min(sweep):
    root, data = sweep
    loss = values(data, "test/loss")
    res = rank_signals(root, "test/loss", against_mode="min", signals=["netprobe/reliance_auc/fc10"], n_boot=50, cv=0)
    row = res["signals"][0]
    sig = values(data, "netprobe/reliance_auc/fc10")
    assert row["kendall_tau"] > 0.5  # a signal that tracks accuracy agrees with a low loss
    assert row["kendall_tau"] == pytest.approx(ref_tau(sig, [-x for x in loss]), abs=1e-9)
    assert row["spearman_rho"] == pytest.approx(-ref_rho(sig, loss), abs=1e-9)
    assert row["kendall_tau_ci"][0] <= row["kendall_tau"] <= row["kendall_tau_ci"][1]
    single = rank_runs(root, "netprobe/reliance_auc/fc10", against="test/loss", against_mode="min", n_boot=50)
    assert single["kendall_tau"] == pytest.approx(row["kendall_tau"]) and single["spearman_rho"] > 0.5
    assert single["kendall_tau_ci"] == pytest.approx(row["kendall_tau_ci"])  # same seed, same runs: the same resamples
    # a "min" signal: dead_fraction falls as accuracy rises, so it agrees
    dead = rank_signals(root, "test/loss", against_mode="min", signals=["netprobe/dead_fraction"], n_boot=0, cv=0)["signals"][0]
    assert dead["kendall_tau"] == pytest.approx(ref_tau(values(data, "netprobe/dead_fraction", -1), [-x for x in loss]), abs=1e-9)
    assert dead["kendall_tau_ci"] is None


def test_cv_inside_the_table_follows_the_reference(sweep):
    root, data = sweep
    res = rank_signals(root, "test/acc", signals=["netprobe/reliance_auc/*"], baselines=["train/loss:min"], n_boot=0, cv=40, seed=1)
    cv = res["cv"]
    assert cv["candidates"] == [f"netprobe/reliance_auc/{layer}" for layer in sorted(LAYERS)]
    acc = values(data, "test/acc")
    sigs = {k: values(data, k) for k in cv["candidates"]}
    chosen, taus, hits, _ = ref_cv(sigs, acc, res["ks"], 40, 1, 0.95)
    assert cv["chosen"] == chosen
    assert cv["heldout_tau"]["mean"] == pytest.approx(np.mean(taus), abs=1e-9)
    assert cv["baselines"]["train/loss"]["n"] == 40
    best = max((r["kendall_tau"], r["signal"]) for r in res["signals"] if r["kind"] == "signal")
    assert cv["in_sample_best"]["kendall_tau"] == pytest.approx(best[0])


def test_hit_rates_over_subsets_and_refusals(sweep):
    root, data = sweep
    res = rank_signals(root, "test/acc", signals=["netprobe/reliance_auc/fc1"], subset_size=4, top_k=[1, 3], n_draws=500,
                       n_boot=20, cv=0)
    row = res["signals"][0]
    sig, acc = values(data, "netprobe/reliance_auc/fc1"), values(data, "test/acc")
    assert row["top_k"] == pytest.approx({str(k): v for k, v in top_k_hits(sig, acc, [1, 3], subset_size=4, n_draws=500).items()})
    assert row["top_k_random"] == pytest.approx({"1": 0.25, "3": 0.75})
    want = jackknife_hit_rates(ref_hit, sig, acc, [1, 3], subset_size=4, n_draws=500, seed=0, level=0.95)
    assert row["top_k"]["3"] == pytest.approx(want[3][0], abs=1e-12)
    assert row["top_k_ci"]["3"] == pytest.approx(want[3][1], abs=1e-9)
    with pytest.raises(SelectionError, match=r"below the subset size 10 \(10 runs ranked\).*k=10"):
        rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], top_k=[1, 10], cv=0)
    with pytest.raises(SelectionError, match=r"below the subset size 4 \(10 runs ranked, --subset-size 4\).*k=4"):
        rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], top_k=[4], subset_size=4, cv=0)
    with pytest.raises(SelectionError, match=r"below the subset size 10 \(10 runs ranked\)"):
        rank_runs(root, "netprobe/reliance_auc", against="test/acc", top_k=[10])
    with pytest.raises(SelectionError, match="Expected a direction for 'netprobe/new_metric'.*netprobe/new_metric:min"):
        rank_signals(root, "test/acc", signals=["netprobe/new_metric"])
    with pytest.raises(SelectionError, match="Expected a direction for 'epoch'"):
        rank_signals(root, "test/acc", baselines=["epoch"])
    loss_row = rank_signals(root, "test/acc", signals=[], baselines=["train/loss"], n_boot=0, cv=0)["signals"][0]
    assert loss_row["mode"] == "min"  # a loss is lower-is-better without being told
    for against in ("epoch", "epoch:sideways"):
        with pytest.raises(SelectionError, match="epoch"):
            rank_signals(root, against, signals=["netprobe/reliance_auc"], cv=0)
    with pytest.raises(SelectionError, match="no known direction.*'epoch:min'"):
        rank_runs(root, "netprobe/reliance_auc", against="epoch")
    by_min = rank_runs(root, "netprobe/reliance_auc", against="train/loss", n_boot=0)  # a loss: lower is better
    by_max = rank_runs(root, "netprobe/reliance_auc", against="train/loss:max", n_boot=0)
    assert by_min["kendall_tau"] == pytest.approx(-by_max["kendall_tau"])
    with pytest.raises(SelectionError, match="matches no key.*netprobe/reliance_auc"):
        rank_signals(root, "test/acc", signals=["netprobe/reliance_acu*"])
    with pytest.raises(SelectionError, match="No run logged 'train/los'.*train/loss"):
        rank_signals(root, "test/acc", baselines=["train/los:min"])
    with pytest.raises(SelectionError, match="against"):
        rank_signals(root, "", signals=["all"])
    new = rank_signals(root, "test/acc", signals=["netprobe/new_metric:min"], n_boot=0, cv=0)["signals"][0]
    assert new["mode"] == "min" and new["kendall_tau"] == pytest.approx(ref_tau(values(data, "netprobe/new_metric", -1), values(data, "test/acc")))


def test_underfit_runs_are_flagged_not_dropped(sweep):
    root, data = sweep
    res = rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], n_boot=0, cv=0)
    pa = np.array(values(data, "netprobe/probe_accuracy"))
    med = np.median(pa)
    mad = np.median(np.abs(pa - med))
    thr = max(med - max(3 * 1.4826 * mad, 0.05), 0.5 * np.median(pa[pa >= med]))
    assert res["underfit"]["threshold"] == pytest.approx(thr)
    assert res["underfit"]["runs"] == ["r06"] and [r["run"] for r in res["runs"] if r["underfit"]] == ["r06"]
    assert res["signals"][0]["n_runs"] == N_RUNS  # flagged, still ranked
    single = rank_runs(root, "netprobe/reliance_auc", against="test/acc", n_boot=0)
    assert {r["run"]: r["underfit"] for r in single["runs"]}["r06"] is True and len(single["runs"]) == N_RUNS
    assert sum(r["underfit"] for r in single["runs"]) == 1
    strict = rank_runs(root, "netprobe/reliance_auc", underfit_below=0.99)
    assert sorted(strict["underfit"]["runs"]) == sorted(n for n in data if data[n]["netprobe/probe_accuracy"] < 0.99)
    with pytest.raises(SelectionError, match="underfit_below"):
        rank_runs(root, "netprobe/reliance_auc", underfit_below=float("nan"))


# ----------------------------------------------------------------------------- the deepest layer
@pytest.fixture(scope="module")
def depth_sweep(tmp_path_factory):
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("depth")
    plans = {  # run -> per step, the layers logged in record order (and an optional layer_index)
        "a": ({10: ["enc.0", "enc.1", "head"], 20: ["enc.0", "enc.1", "head"]}, None),
        "b": ({10: ["enc.0", "head"], 20: ["enc.0", "enc.1", "head"]}, None),  # enc.1 skipped at the first measurement
        "c": ({10: ["z", "y"]}, {"z": 0, "y": 1}),  # logged z, y; the forward order says y is deeper
        "d": ({10: ["p"], 20: ["q"]}, None),  # never logged together: no order
        "e": ({10: ["only"]}, None),
    }
    vals = {}
    for run, (steps, index) in plans.items():
        with SummaryWriter(str(root / run)) as w:
            for step, layers in steps.items():
                for j, layer in enumerate(layers):
                    v = f32(0.1 * (j + 1) + 0.01 * len(run))
                    vals[(run, layer)] = v
                    w.add_scalar(f"netprobe/reliance_auc/{layer}", v, step)
                w.add_scalar("netprobe/reliance_auc", 0.5, step)
            for layer, i in (index or {}).items():
                w.add_scalar(f"netprobe/layer_index/{layer}", i, 0)
            w.add_scalar("test/acc", 0.5 + 0.1 * len(vals), 30)
    return root, vals


def test_deepest_layer_comes_from_layer_index_and_is_refused_without_it(depth_sweep):
    root, vals = depth_sweep
    # a, b: records in forward order but no netprobe/layer_index: the record order (registration
    # order) is not taken for the forward order
    assert layer_order(load_run(str(root / "a")), "reliance_auc") == (["enc.0", "enc.1", "head"], None)
    assert layer_order(load_run(str(root / "b")), "reliance_auc") == (["enc.0", "enc.1", "head"], None)
    assert layer_order(load_run(str(root / "c")), "reliance_auc") == (["z", "y"], "layer_index")
    assert layer_order(load_run(str(root / "d")), "reliance_auc") == (["p", "q"], None)
    assert layer_order(load_run(str(root / "e")), "reliance_auc") == (["only"], "single")
    res = rank_runs(root, "netprobe/reliance_auc", layer="deepest")
    keys = {r["run"]: r["key"] for r in res["runs"]}
    assert keys == {"c": "netprobe/reliance_auc/y", "e": "netprobe/reliance_auc/only"}
    assert {r["run"]: r["signal"] for r in res["runs"]}["c"] == pytest.approx(vals[("c", "y")])
    reasons = {s["run"]: s["reason"] for s in res["skipped"]}
    for run in ("a", "b", "d"):
        assert "is not in its logs" in reasons[run] and "--layer NAME" in reasons[run], run
    assert res["layer_source"] == ["layer_index", "single"]
    alias = rank_runs(root, "netprobe/reliance_auc@deepest")
    assert [r["run"] for r in alias["runs"]] == [r["run"] for r in res["runs"]] and alias["metric"] == "netprobe/reliance_auc@deepest"
    named = rank_runs(root, "netprobe/reliance_auc", layer="enc.1")
    assert sorted(r["run"] for r in named["runs"]) == ["a", "b"]
    assert "no 'netprobe/reliance_auc/enc.1'" in {s["run"]: s["reason"] for s in named["skipped"]}["c"]
    with pytest.raises(SelectionError, match="without a layer"):
        rank_runs(root, "netprobe/reliance_auc/head", layer="deepest")
    with pytest.raises(SelectionError, match="per-layer key netprobe/probe_accuracy/<layer>"):
        rank_runs(root, "netprobe/probe_accuracy@deepest")


# ----------------------------------------------------------------------------- the command
def test_cli_table_end_to_end(sweep, tmp_path):
    root, data = sweep
    script = Path(sys.executable).with_name("netprobe")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "netprobe"]
    out = subprocess.run(cmd + ["rank", str(root), "--against", "test/acc", "--signals", "all", "--baseline", "train/loss:min",
                                "--boot", "100", "--cv", "30", "--top-k", "1,3"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    lines = text.splitlines()
    assert lines[0] == "10 runs judged against test/acc (max, its last value), signals at last: 8 signals, 1 baseline"
    head = next(line for line in lines if line.startswith("signal "))
    assert head.split() == ["signal", "dir", "runs", "tau", "95%", "CI", "rho", "95%", "CI", "pick", "ref", "rank",
                            "top-1", "95%", "CI", "random", "top-3", "95%", "CI", "random"]
    res = rank_signals(root, "test/acc", signals=["all"], baselines=["train/loss:min"], top_k=[1, 3], n_boot=100, cv=30)
    for r in res["signals"]:
        name = r["signal"] + (" (baseline)" if r["kind"] == "baseline" else "")
        line = next(line for line in lines if line.startswith(name + " "))
        cells = line[len(name):].split()
        lo, hi = r["kendall_tau_ci"]
        assert cells[:4] == [r["mode"], "10", f"{r['kendall_tau']:.3f}", f"[{lo:.2f},"]
        assert f"{r['top_k']['3']:.2f}" in cells and cells[-1] == "0.30" and "0.10" in cells  # random 3/10 and 1/10
    assert "not evaluated  netprobe/new_metric: direction unknown" in text
    assert "underfit runs (flagged, still ranked; filter with --where): r06 (0.400)" in text
    assert "Cross-validated choice (30 random half splits of the 10 runs)" in text
    assert f"held-out tau of the chosen signal: mean {res['cv']['heldout_tau']['mean']:.3f}" in text
    assert "baseline train/loss on the same held-out halves" in text and "not a confidence interval" in text
    assert "netprobe/reliance_auc@deepest: deepest by netprobe/layer_index (forward-pass position)" in text
    assert "95% bootstrap percentile intervals (100 resamples of the runs with replacement, seed 0)" in text
    # --json: one valid document
    doc = json.loads(subprocess.run(cmd + ["rank", str(root), "--against", "test/acc", "--signals", "netprobe/reliance_auc*",
                                           "--boot", "20", "--cv", "5", "--json"], capture_output=True, text=True,
                                          timeout=180).stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert [r["signal"] for r in doc["signals"]] == ["netprobe/reliance_auc", *(f"netprobe/reliance_auc/{layer}" for layer in sorted(LAYERS)),
                                                     "netprobe/reliance_auc@deepest"]
    assert doc["cv"]["n_splits"] == 5


def test_cli_single_signal_summary_refusals_and_plurals(sweep, tmp_path, capsys):
    root, _ = sweep
    assert main(["rank", str(root), "--against", "test/acc", "--metric", "netprobe/reliance_auc/fc10", "--top-k", "1,3", "--boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "10 runs ranked by netprobe/reliance_auc/fc10 (max, at last)" in out
    assert "(random 0.10)" in out and "(random 0.30)" in out and "kendall_tau" in out and "] " in out
    assert "UNDERFIT" in out and "95% bootstrap percentile intervals (50 resamples" in out
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--top-k", "10"]) == 2
    err = capsys.readouterr().err
    assert "10 runs ranked" in err and "k=10" in err and "Traceback" not in err
    assert main(["rank", str(root), "--signals", "all"]) == 2
    assert "--against" in capsys.readouterr().err
    assert main(["rank", str(root), "--against", "test/acc", "--signals", "all", "--layer", "deepest"]) == 2
    assert "KEY@deepest" in capsys.readouterr().err
    # --mode follows the key's known direction: dead_fraction is lower-is-better
    assert main(["rank", str(root), "--metric", "netprobe/dead_fraction", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "min"
    from torch.utils.tensorboard import SummaryWriter

    for name, acc in (("one", 0.9), ("two", 0.8)):
        with SummaryWriter(str(tmp_path / name)) as w:
            w.add_scalar("netprobe/reliance_auc", acc, 1)
            w.add_scalar("train/loss", 1 - acc, 1)
            w.add_scalar("test/acc", acc, 1)
    assert main(["rank", str(tmp_path), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--where", "test/acc>0.85"]) == 0
    out = capsys.readouterr().out
    assert "1 run ranked by" in out and "1 runs" not in out and "of 1\n" in out
    assert main(["rank", str(tmp_path), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--baseline", "train/loss:min", "--boot", "10"]) == 0
    out = capsys.readouterr().out
    assert "2 runs judged against test/acc" in out and ": 1 signal, 1 baseline" in out
    assert "cross-validated choice: not run (needs at least 6 runs (halves of 3 or more), got 2 runs)" in out
    assert "top-1" in out and "random" in out


def test_cli_output_into_a_closed_pipe_has_no_traceback(tmp_path):
    # `netprobe rank ... | head -1`: the reader closes the pipe early
    import subprocess
    import sys

    from torch.utils.tensorboard import SummaryWriter

    for i in range(40):
        with SummaryWriter(str(tmp_path / f"run{i:02d}")) as w:
            w.add_scalar("netprobe/reliance_auc", 0.5 + i / 100, 0)
            w.add_scalar("test/acc", 0.5 + (i % 7) / 10, 0)
    cmd = f"{sys.executable} -m netprobe rank {tmp_path} --metric netprobe/reliance_auc --against test/acc --boot 0 | head -1"
    out = subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
    assert out.stdout.strip()


# ----------------------------------------------------------------------------- groups (several seeds per configuration)
def ref_cluster_replicates(sig, ref, groups, n_boot, seed, ks=()):
    """A cluster bootstrap, replicate by replicate: the groups (sorted labels) drawn with
    replacement by `default_rng(seed).integers(0, G, size=(n_boot, G))`, each drawn group with all
    its runs; tau over the pairs that do not join two different draws of one group; rho (scipy)
    (and, for the copies test, the top-k hit over all the runs of the replicate)."""
    labels = sorted(set(groups))
    members = [[i for i, g in enumerate(groups) if g == lab] for lab in labels]
    draws = np.random.default_rng(seed).integers(0, len(labels), size=(n_boot, len(labels)))
    taus, rhos, hits = [], [], {k: [] for k in ks}
    for row in draws:
        runs, draw_of = [], []
        for d, g in enumerate(row):
            for i in members[g]:
                runs.append(i)
                draw_of.append(d)
        x = [sig[i] for i in runs]
        y = [ref[i] for i in runs]
        grp = [groups[i] for i in runs]
        taus.append(tau_b_pairs_loop(x, y, lambda i, j: not (grp[i] == grp[j] and draw_of[i] != draw_of[j])))
        rhos.append(ref_rho(x, y))
        for k in ks:
            hits[k].append(ref_hit(x, y, k, runs))
    return taus, rhos, hits


def ref_run_replicate_taus(sig, ref, n_boot, seed):
    idx = np.random.default_rng(seed).integers(0, len(sig), size=(n_boot, len(sig)))
    return [ref_tau([sig[i] for i in row], [ref[i] for i in row]) for row in idx]


@pytest.mark.parametrize("seed", [0, 4])
def test_cluster_bootstrap_matches_a_plain_loop_replicate_by_replicate(seed):
    rng = np.random.default_rng(200 + seed)
    sizes = [3, 3, 2, 3, 1, 3, 3]  # unequal groups: replicates of different sizes
    groups = [f"g{g}" for g, n in enumerate(sizes) for _ in range(n)]
    conf = {g: rng.normal() for g in set(groups)}
    ref = [round(conf[g] + 0.3 * rng.normal(), 1) for g in groups]  # ties
    sig = [round(conf[g] + 0.6 * rng.normal(), 1) for g in groups]
    got = bootstrap_intervals(sig, ref, ks=[1, 3], subset_size=8, n_boot=150, level=0.9, seed=seed, groups=groups,
                              n_draws=400)
    taus, rhos, _ = ref_cluster_replicates(sig, ref, groups, 150, seed)
    hits = jackknife_hit_rates(ref_hit, sig, ref, [1, 3], subset_size=8, n_draws=400, seed=seed, level=0.9, groups=groups)
    assert got["resampled"] == "groups" and got["n_groups"] == len(sizes)
    assert got["kendall_tau"] == pytest.approx(ref_percentile(taus, 0.9), abs=1e-9)
    assert got["spearman_rho"] == pytest.approx(ref_percentile(rhos, 0.9), abs=1e-9)
    for k in (1, 3):
        assert got["top_k"][k] == pytest.approx(hits[k][1], abs=1e-9)
    assert got["undefined"]["kendall_tau"] == sum(math.isnan(t) for t in taus)
    # one run per group: the cluster bootstrap is the run bootstrap
    single = bootstrap_intervals(sig, ref, ks=[1], n_boot=150, seed=seed, groups=[str(i) for i in range(len(sig))])
    plain = bootstrap_intervals(sig, ref, ks=[1], n_boot=150, seed=seed)
    labels_sorted = sorted(str(i) for i in range(len(sig)))  # groups are numbered in sorted label order
    assert plain["resampled"] == "runs" and plain["n_groups"] is None
    perm = [int(s) for s in labels_sorted]
    again = bootstrap_intervals([sig[i] for i in perm], [ref[i] for i in perm], ks=[1], n_boot=150, seed=seed)
    assert single["kendall_tau"] == pytest.approx(again["kendall_tau"], abs=1e-12)
    assert single["spearman_rho"] == pytest.approx(again["spearman_rho"], abs=1e-12)


def test_cluster_bootstrap_with_subsets_and_refusals():
    rng = np.random.default_rng(9)
    groups = [g for g in "abcdef" for _ in range(3)]
    sig = list(rng.normal(size=18))
    ref = list(np.array(sig) + rng.normal(size=18))
    got = bootstrap_intervals(sig, ref, ks=[1, 2], subset_size=5, n_boot=40, n_draws=300, seed=3, groups=groups)
    # the grouped jackknife: each group left out in turn
    hits = jackknife_hit_rates(ref_hit, sig, ref, [2], subset_size=5, n_draws=300, seed=3, level=0.95, groups=groups)
    assert got["top_k"][2] == pytest.approx(hits[2][1], abs=1e-9)
    with pytest.raises(SelectionError, match="one group label per run"):
        bootstrap_intervals(sig, ref, groups=groups[:-1])


def test_tau_difference_is_paired_and_matches_plain_loops():
    rng = np.random.default_rng(21)
    groups = [f"c{g}" for g in range(8) for _ in range(3)]
    conf = {g: rng.normal() for g in set(groups)}
    ref = [conf[g] + 0.3 * rng.normal() for g in groups]
    a = [r + 0.3 * rng.normal() for r in ref]
    loss = [-(r + 1.0 * rng.normal()) for r in ref]  # lower is better
    got = tau_difference(a, loss, ref, mode_b="min", n_boot=120, level=0.9, seed=5)
    ta = ref_run_replicate_taus(a, ref, 120, 5)
    tb = ref_run_replicate_taus([-x for x in loss], ref, 120, 5)
    assert got["difference"] == pytest.approx(ref_tau(a, ref) - ref_tau([-x for x in loss], ref), abs=1e-12)
    assert got["interval"] == pytest.approx(ref_percentile(np.subtract(ta, tb), 0.9), abs=1e-9)
    assert got["resampled"] == "runs" and got["n_runs"] == 24
    grouped = tau_difference(a, loss, ref, mode_b="min", n_boot=120, level=0.9, seed=5, groups=groups)
    ga, _, _ = ref_cluster_replicates(a, ref, groups, 120, 5)
    gb, _, _ = ref_cluster_replicates([-x for x in loss], ref, groups, 120, 5)
    assert grouped["interval"] == pytest.approx(ref_percentile(np.subtract(ga, gb), 0.9), abs=1e-9)
    assert grouped["resampled"] == "groups" and grouped["n_groups"] == 8
    # the same resamples as each tau's own interval: a signal against itself differs by exactly 0
    same = tau_difference(a, a, ref, n_boot=50, groups=groups)
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0]
    # paired is narrower than the two intervals' widths would suggest for two correlated signals
    b = [x + 0.05 * rng.normal() for x in a]
    d = tau_difference(a, b, ref, n_boot=300, groups=groups)
    ia = bootstrap_intervals(a, ref, n_boot=300, groups=groups)["kendall_tau"]
    assert d["interval"][1] - d["interval"][0] < ia[1] - ia[0]
    with pytest.raises(SelectionError, match="finite"):
        tau_difference([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(SelectionError, match="mode_a"):
        tau_difference(a, b, ref, mode_a="up")


def ref_group_cv(signals, ref, groups, n_splits, seed):
    """The grouped half splits as a plain loop: permute the groups (sorted labels), the runs of the
    first half of them choose (best tau, the first on a tie), the others are held out."""
    labels = sorted(set(groups))
    rng = np.random.default_rng([seed, 1])
    names = list(signals)
    chosen = {s: 0 for s in names}
    taus = []
    for _ in range(n_splits):
        perm = rng.permutation(len(labels))
        first = {labels[g] for g in perm[: len(labels) // 2]}
        a = [i for i, g in enumerate(groups) if g in first]
        b = [i for i, g in enumerate(groups) if g not in first]
        assert not first & {groups[i] for i in b}  # no group on both sides
        scores = [ref_tau([signals[s][i] for i in a], [ref[i] for i in a]) for s in names]
        best = names[int(np.nanargmax(scores))]
        chosen[best] += 1
        taus.append(ref_tau([signals[best][i] for i in b], [ref[i] for i in b]))
    return chosen, taus


def test_grouped_cross_validation_splits_groups():
    rng = np.random.default_rng(5)
    groups = [f"c{g:02d}" for g in range(10) for _ in range(3)]
    conf = {g: rng.normal() for g in set(groups)}
    ref = np.array([conf[g] + 0.2 * rng.normal() for g in groups])
    signals = {"good": ref + 0.5 * rng.normal(size=30), "seedy": np.array([conf[g] for g in groups]) + rng.normal(size=30),
               "noise": rng.normal(size=30)}
    got = cross_validate_choice(signals, ref, n_splits=40, seed=3, groups=groups)
    chosen, taus = ref_group_cv({k: list(v) for k, v in signals.items()}, list(ref), groups, 40, 3)
    assert got["split"] == "groups" and got["n_groups"] == 10
    assert got["chosen"] == chosen
    assert got["heldout_tau"]["mean"] == pytest.approx(np.mean(taus), abs=1e-12)
    assert cross_validate_choice(signals, ref, n_splits=5)["split"] == "runs"
    with pytest.raises(SelectionError, match="at least 4 groups"):
        cross_validate_choice(signals, ref, groups=["a", "b", "c"] * 10)


def test_group_labels_and_refusals():
    runs = [Run(f"c{c}_lr{lr}_s{s}", "", hparams={"lr": lr, "width": 8 * (c + 1)})
            for c, lr in enumerate([0.1, 0.01, 0.1]) for s in range(2)]
    assert set(group_labels(runs, group=r"^(c\d+)_").values()) == {"c0", "c1", "c2"}
    assert group_labels(runs, group=r"c\d")["c1_lr0.01_s1"] == "c1"  # no capture group: the whole match
    assert len(set(group_labels(runs, group_by=["lr"]).values())) == 2
    assert len(set(group_labels(runs, group_by="lr,width").values())) == 3
    with pytest.raises(SelectionError, match=r"matches no run name.*capture group"):
        group_labels(runs, group=r"^(cfg\d+)_")
    with pytest.raises(SelectionError, match=r"but not 'c2_lr0.1_s0'.*widen the pattern"):
        group_labels(runs, group=r"^(c[01])_")
    with pytest.raises(SelectionError, match="regular expression"):
        group_labels(runs, group="(c")
    with pytest.raises(SelectionError, match=r"No run has the hyperparameter 'depth'.*Closest"):
        group_labels(runs, group_by="depth")
    runs[0].hparams.pop("lr")
    with pytest.raises(SelectionError, match=r"'c0_lr0.1_s0'.*lack it"):
        group_labels(runs, group_by="lr")
    with pytest.raises(SelectionError, match="neither"):
        group_labels(runs)


# 72 runs of the wide MNIST-1D sweep (examples/hparam_selection.py --grid wide, /tmp/sweep_study_wide at
# the time of writing): their last netprobe/probe_accuracy, a third of them near chance (10 classes)
WIDE_SWEEP_PROBE_ACCURACY = [
    0.07, 0.102, 0.113, 0.18, 0.18, 0.184, 0.207, 0.211, 0.219, 0.219, 0.223, 0.258, 0.262, 0.281, 0.293, 0.293, 0.301,
    0.375, 0.379, 0.387, 0.41, 0.473, 0.48, 0.48, 0.488, 0.516, 0.527, 0.531, 0.535, 0.547, 0.551, 0.566, 0.57, 0.574,
    0.574, 0.574, 0.578, 0.578, 0.586, 0.598, 0.605, 0.621, 0.621, 0.621, 0.645, 0.648, 0.652, 0.688, 0.699, 0.777, 0.781,
    0.801, 0.812, 0.82, 0.82, 0.844, 0.875, 0.883, 0.922, 0.934, 0.965, 0.98, 0.98, 0.988, 0.992, 0.996, 0.996, 0.996,
    1.0, 1.0, 1.0, 1.0]


def ref_underfit_threshold(values):
    v = np.asarray(values, dtype=float)
    med = np.median(v)
    outlier = med - max(3 * 1.4826 * np.median(np.abs(v - med)), 0.05)
    return max(outlier, 0.5 * np.median(v[v >= med])), outlier


def runs_with_probe_accuracy(values):
    return [Run(f"r{i:03d}", "", scalars={"netprobe/probe_accuracy": [(1, float(v))]}) for i, v in enumerate(values)]


def test_underfit_rule_flags_the_lower_mode_of_a_bimodal_sweep():
    from netprobe.select import _underfit

    # the wide sweep: the old rule's threshold is negative and flagged nothing
    thr, outlier = ref_underfit_threshold(WIDE_SWEEP_PROBE_ACCURACY)
    assert outlier < 0
    res = _underfit(runs_with_probe_accuracy(WIDE_SWEEP_PROBE_ACCURACY), "last", None)
    assert res["threshold"] == pytest.approx(thr)
    flagged = [v for v in WIDE_SWEEP_PROBE_ACCURACY if v < thr]
    assert len(res["runs"]) == len(flagged) == 20 and max(flagged) < 0.4 and "upper half" in res["rule"]
    # synthetic bimodal: 10 runs near chance, 20 that fit
    rng = np.random.default_rng(0)
    bimodal = list(0.1 + 0.03 * rng.random(10)) + list(0.9 + 0.08 * rng.random(20))
    res = _underfit(runs_with_probe_accuracy(bimodal), "last", None)
    assert sorted(res["runs"]) == [f"r{i:03d}" for i in range(10)]
    # a unimodal sweep: only the far outlier, none of the spread
    uni = list(0.95 + 0.01 * rng.normal(size=29)) + [0.6]
    res = _underfit(runs_with_probe_accuracy(uni), "last", None)
    assert res["runs"] == ["r029"] and res["threshold"] == pytest.approx(ref_underfit_threshold(uni)[0])
    # most runs at 1.0: a run at 0.99 is not flagged (the 0.05 floor)
    assert _underfit(runs_with_probe_accuracy([1.0] * 9 + [0.99]), "last", None)["runs"] == []
    # the explicit override wins over both rules
    assert len(_underfit(runs_with_probe_accuracy(bimodal), "last", 0.05)["runs"]) == 0


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory):
    """8 configurations x 3 seeds; each run's hparams.yaml names its configuration and learning rate."""
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("seeds")
    rng = np.random.default_rng(3)
    data = {}
    for c in range(8):
        level = rng.normal()
        for s in range(3):
            name = f"c{c:02d}_s{s}"
            acc = 0.8 + 0.05 * level + 0.01 * rng.normal()
            vals = {"test/acc": f32(acc), "netprobe/reliance_auc": f32(0.5 + 0.05 * level + 0.05 * rng.normal()),
                    "netprobe/probe_accuracy": f32(0.95 + 0.01 * rng.normal()), "train/loss": f32(1 - acc + 0.01 * rng.normal())}
            with SummaryWriter(str(root / name)) as w:
                for k, v in vals.items():
                    w.add_scalar(k, v, 5)
            (root / name / "hparams.yaml").write_text(f"config: {c}\nlr: {0.1 if c % 2 else 0.01}\nseed: {s}\n")
            data[name] = vals
    return root, data


def test_grouped_table_and_compare_against_plain_loops(seed_sweep):
    root, data = seed_sweep
    names = sorted(data)
    groups = [n.split("_")[0] for n in names]
    res = rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], baselines=["train/loss:min"], n_boot=80,
                       cv=30, group=r"^(c\d+)_", compare=["train/loss,netprobe/reliance_auc"], top_k=[1, 3])
    assert res["bootstrap"]["resampled"] == "groups" and res["bootstrap"]["n_groups"] == 8
    assert res["grouping"]["n_groups"] == 8 and res["grouping"]["runs_per_group"] == [3, 3]
    assert [r["group"] for r in res["runs"]] == groups
    rel = [data[n]["netprobe/reliance_auc"] for n in names]
    loss = [data[n]["train/loss"] for n in names]
    acc = [data[n]["test/acc"] for n in names]
    row = res["signals"][0]
    assert row["values"] == {n: data[n]["netprobe/reliance_auc"] for n in names}  # each run's value, as logged
    taus, rhos, _ = ref_cluster_replicates(rel, acc, groups, 80, 0)
    assert row["kendall_tau_ci"] == pytest.approx(ref_percentile(taus, 0.95), abs=1e-9)
    assert row["spearman_rho_ci"] == pytest.approx(ref_percentile(rhos, 0.95), abs=1e-9)
    assert row["top_k_ci"]["3"] is None  # one pick among all 24 runs: no interval
    (cmp,) = res["compare"]
    neg = [-x for x in loss]
    assert cmp["a"] == "train/loss" and cmp["b"] == "netprobe/reliance_auc" and cmp["n_runs"] == 24
    assert cmp["difference"] == pytest.approx(ref_tau(neg, acc) - ref_tau(rel, acc), abs=1e-9)
    ta, _, _ = ref_cluster_replicates(neg, acc, groups, 80, 0)
    tb, _, _ = ref_cluster_replicates(rel, acc, groups, 80, 0)
    assert cmp["interval"] == pytest.approx(ref_percentile(np.subtract(ta, tb), 0.95), abs=1e-9)
    assert res["cv"]["split"] == "groups" and res["cv"]["n_groups"] == 8
    # grouping by hyperparameter gives the same groups as the regex here
    by_hp = rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], n_boot=80, cv=0, group_by=["config"])
    assert by_hp["signals"][0]["kendall_tau_ci"] == pytest.approx(row["kendall_tau_ci"], abs=1e-12)
    # rank_runs takes the same grouping and gives the same interval
    single = rank_runs(root, "netprobe/reliance_auc", against="test/acc", n_boot=80, group=r"^(c\d+)_", top_k=[1])
    assert single["kendall_tau_ci"] == pytest.approx(row["kendall_tau_ci"], abs=1e-12)
    assert single["bootstrap"]["resampled"] == "groups" and {r["group"] for r in single["runs"]} == set(groups)
    # ungrouped: the runs are resampled, and the data says so
    plain = rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], n_boot=80, cv=0)
    assert plain["bootstrap"]["resampled"] == "runs" and plain["grouping"] is None and plain["runs"][0]["group"] is None
    assert plain["compare"] == []
    with pytest.raises(SelectionError, match="matches no run name"):
        rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], n_boot=10, cv=0, group=r"^(cfg\d+)")
    with pytest.raises(SelectionError, match="at least 2 groups"):
        rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], n_boot=10, cv=0, group=r"^c")
    with pytest.raises(SelectionError, match=r"Cannot compare 'val/acc'.*--baseline"):
        rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], n_boot=10, cv=0, compare=["val/acc,netprobe/reliance_auc"])
    with pytest.raises(SelectionError, match="two signals"):
        rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], n_boot=10, cv=0, compare=["netprobe/reliance_auc"])


def test_cli_groups_and_compare_end_to_end(seed_sweep, tmp_path, capsys):
    root, data = seed_sweep
    args = ["rank", str(root), "--against", "test/acc", "--signals", "netprobe/reliance_auc", "--baseline", "train/loss:min",
            "--boot", "60", "--cv", "20", "--top-k", "1"]
    assert main(args + ["--group", r"^(c\d+)_", "--compare", "train/loss,netprobe/reliance_auc"]) == 0
    out = capsys.readouterr().out
    assert "60 resamples of the 8 groups with replacement, each with all its runs: a cluster bootstrap" in out
    assert r"groups: 8 groups by regex '^(c\d+)_' on the run names (3 runs each)" in out
    assert "tau(train/loss) - tau(netprobe/reliance_auc) = " in out and "paired 95% bootstrap interval over 8 groups" in out
    assert "half splits of the 8 groups (no group on both sides)" in out
    assert main(args + ["--group-by", "config", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bootstrap"]["resampled"] == "groups" and doc["grouping"]["by"] == ["config"]
    assert doc["signals"][0]["values"]["c00_s0"] == pytest.approx(data["c00_s0"]["netprobe/reliance_auc"])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resamples of the runs with replacement" in out and "pass --group or --group-by" in out
    # single-signal table with groups
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--boot", "30", "--group-by", "lr,config"]) == 0
    assert "groups: 8 groups by hyperparameters lr, config (3 runs each)" in capsys.readouterr().out
    # refusals: exit 2 with the fix
    assert main(args + ["--group", "^(cfg)"]) == 2
    err = capsys.readouterr().err
    assert "matches no run name" in err and "capture group" in err
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--compare", "a,b"]) == 2
    assert "--compare A,B with the table" in capsys.readouterr().err
    assert main(args + ["--group-by", "depth"]) == 2
    assert "No run has the hyperparameter 'depth'" in capsys.readouterr().err


def test_a_perfect_signal_has_hit_rate_intervals_of_one():
    # a perfect signal: every subset's pick is its best run, so every leave-one-out rate is 1 too
    sig = list(np.linspace(0.1, 0.9, 10))
    got = bootstrap_intervals(sig, sig, ks=[1, 3], subset_size=6, n_boot=300, seed=0)
    assert got["top_k"][1] == [1.0, 1.0] and got["top_k"][3] == [1.0, 1.0]
    got = bootstrap_intervals(sig, sig, ks=[1], subset_size=6, n_boot=300, seed=0, groups=[i // 2 for i in range(10)])
    assert got["top_k"][1] == [1.0, 1.0]
    got = bootstrap_intervals(sig, sig, ks=[1], subset_size=4, n_boot=50, n_draws=200, seed=0)
    assert got["top_k"][1] == [1.0, 1.0]


def test_public_statistics_refuse_a_misspelled_direction():
    from netprobe.select import top_k_hits

    with pytest.raises(SelectionError, match="'max' or 'min'"):
        bootstrap_intervals([1, 2, 3], [1, 2, 3], mode="Max")
    with pytest.raises(SelectionError, match="'max' or 'min'"):
        top_k_hits([1, 2, 3], [1, 2, 3], [1], mode="maximize")
    with pytest.raises(SelectionError, match="'max' or 'min'"):
        top_k_hits([1, 2, 3], [1, 2, 3], [1], reference_mode="up")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_hit_rate_intervals_always_hold_their_estimate(data):
    """Random sweeps of 3-20 runs with ties, any subset size and k: the interval holds the rate
    (the same rate top_k_hits gives), lies in [0, 1], and is None exactly when the subset is every run."""
    n = data.draw(st.integers(3, 20))
    values = st.lists(st.integers(0, 4).map(float), min_size=n, max_size=n)  # few values: many ties
    sig, ref = data.draw(values), data.draw(values)
    m = data.draw(st.integers(2, n))
    k = data.draw(st.integers(1, m - 1))
    groups = data.draw(st.one_of(st.none(), st.lists(st.sampled_from("abc"), min_size=n, max_size=n)))
    res = top_k_intervals(sig, ref, [k], subset_size=m, n_draws=200, seed=1, groups=groups)
    est, ci = res["estimate"][k], res["interval"][k]
    assert est == top_k_hits(sig, ref, [k], subset_size=m, n_draws=200, seed=1)[k]
    if m == n:
        assert ci is None and res["undefined"]
    elif ci is not None:
        assert 0.0 <= ci[0] <= est <= ci[1] <= 1.0
    else:
        assert res["undefined"]


def test_a_six_run_sweep_never_prints_an_interval_that_excludes_its_rate(tmp_path, capsys):
    """The sweep a new user ran: 6 runs, top-5 over all of them is one 0/1 outcome (no interval);
    with a subset size the interval holds the rate."""
    from torch.utils.tensorboard import SummaryWriter

    accs = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    for i, acc in enumerate(accs):
        with SummaryWriter(str(tmp_path / f"run{i}")) as w:
            w.add_scalar("netprobe/reliance_auc", 0.1 * i, 1)  # the worst run has the best signal
            w.add_scalar("test/acc", acc, 1)
    assert main(["rank", str(tmp_path), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--top-k", "5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["top_k"]["5"] == 0.0 and doc["top_k_ci"]["5"] is None
    assert main(["rank", str(tmp_path), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--top-k", "2", "--subset-size", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    lo, hi = doc["top_k_ci"]["2"]
    assert lo <= doc["top_k"]["2"] <= hi


def test_the_default_signal_is_the_deepest_layers_reliance_auc(tmp_path, capsys):
    # netprobe rank without --metric reads netprobe/reliance_auc at each run's deepest layer (by
    # netprobe/layer_index), not the mean over layers; logs with the mean only are refused, naming --metric
    from torch.utils.tensorboard import SummaryWriter

    from netprobe.cli import main

    for i in range(6):
        with SummaryWriter(str(tmp_path / f"r{i}")) as w:
            w.add_scalar("netprobe/layer_index/a", 1.0, 0)
            w.add_scalar("netprobe/layer_index/b", 2.0, 0)
            w.add_scalar("netprobe/reliance_auc/a", 0.9 - 0.1 * i, 1)  # the first layer: the reverse order
            w.add_scalar("netprobe/reliance_auc/b", 0.2 + 0.1 * i, 1)  # the deepest: the order of test/acc
            w.add_scalar("netprobe/reliance_auc", 0.55, 1)
            w.add_scalar("test/acc", 0.5 + 0.05 * i, 1)
    assert main(["rank", str(tmp_path), "--against", "test/acc", "--json", "--boot", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["metric"] == "netprobe/reliance_auc@deepest" and res["pick"] == "r5", res
    assert res["kendall_tau"] == pytest.approx(1.0)
    mean_only = tmp_path.parent / "mean_only"
    with SummaryWriter(str(mean_only / "r0")) as w:
        w.add_scalar("netprobe/reliance_auc", 0.5, 1)
    assert main(["rank", str(mean_only)]) == 2
    assert "`netprobe rank --metric netprobe/reliance_auc`" in capsys.readouterr().err
