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
from scipy import stats

from netprobe.cli import main
from netprobe.select import (
    SelectionError, bootstrap_intervals, cross_validate_choice, key_direction, layer_order, load_run, parse_signal,
    rank_runs, rank_signals, top_k_hits,
)


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


def ref_hit(sig, ref, k):
    """Chance that the best-signal run is in the top k by the reference (both higher = better):
    a tie for the best signal averages over the tied runs; a run with `better` runs strictly above it
    and `equal` others tied with it is in the top k with probability clip((k - better) / (equal + 1))."""
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


def ref_bootstrap(sig, ref, ks, *, n_boot, level, seed, subset_size=None, boot_draws=100):
    """The documented bootstrap, replicate by replicate: resample runs with replacement, recompute."""
    n = len(sig)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    taus, rhos, hits = [], [], {k: [] for k in ks}
    for b in range(n_boot):
        s = [sig[i] for i in idx[b]]
        r = [ref[i] for i in idx[b]]
        taus.append(ref_tau(s, r))
        rhos.append(ref_rho(s, r))
    m = n if subset_size is None else subset_size
    for b in range(n_boot):
        s = [sig[i] for i in idx[b]]
        r = [ref[i] for i in idx[b]]
        if m == n:
            for k in ks:
                hits[k].append(ref_hit(s, r, k))
        else:
            order = np.argsort(rng.random((boot_draws, n)), axis=1)[:, :m]
            for k in ks:
                hits[k].append(np.mean([ref_hit([s[j] for j in row], [r[j] for j in row], k) for row in order]))
    return {"kendall_tau": ref_percentile(taus, level), "spearman_rho": ref_percentile(rhos, level),
            "top_k": {k: ref_percentile(hits[k], level) for k in ks}}


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
    want = ref_bootstrap(sig, ref, [1, 3], n_boot=300, level=0.9, seed=seed)
    assert got["kendall_tau"] == pytest.approx(want["kendall_tau"], abs=1e-9)
    assert got["spearman_rho"] == pytest.approx(want["spearman_rho"], abs=1e-9)
    for k in (1, 3):
        assert got["top_k"][k] == pytest.approx(want["top_k"][k], abs=1e-9)
    assert got["n_boot"] == 300 and got["level"] == 0.9


def test_bootstrap_intervals_with_subsets_and_orientation():
    rng = np.random.default_rng(7)
    sig = list(rng.normal(size=8))
    loss = list(-np.array(sig) + 0.5 * rng.normal(size=8))  # lower loss = better, agrees with the signal
    got = bootstrap_intervals(sig, loss, reference_mode="min", ks=[1, 2], subset_size=4, n_boot=60, boot_draws=20, seed=5)
    want = ref_bootstrap(sig, [-x for x in loss], [1, 2], n_boot=60, level=0.95, seed=5, subset_size=4, boot_draws=20)
    assert got["kendall_tau"] == pytest.approx(want["kendall_tau"], abs=1e-9)
    assert got["top_k"][2] == pytest.approx(want["top_k"][2], abs=1e-9)
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
    assert key_direction("netprobe/time/RelianceMonitor") is None and key_direction("train/loss") is None
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
LAYERS = ("fc1", "fc2", "fc10")  # logged in this order: the deepest is fc10 (by name it would sort before fc2)


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
        want = ref_bootstrap(sig, acc, res["ks"], n_boot=200, level=0.9, seed=4)
        assert row["kendall_tau_ci"] == pytest.approx(want["kendall_tau"], abs=1e-9)
        assert row["spearman_rho_ci"] == pytest.approx(want["spearman_rho"], abs=1e-9)
        for k in res["ks"]:
            assert row["top_k"][str(k)] == pytest.approx(ref_hit(sig, acc, k))
            assert row["top_k_ci"][str(k)] == pytest.approx(want["top_k"][k], abs=1e-9)
            assert row["top_k_random"][str(k)] == pytest.approx(k / N_RUNS)
        best = max(sig)
        ties = [n for n, s in zip(sorted(data), sig) if s == best]
        assert row["pick"] == ties[0] and row["pick_ties"] == ties
        ranks = stats.rankdata([-a for a in acc])
        assert row["pick_reference_rank"] == pytest.approx(np.mean([r for r, s in zip(ranks, sig) if s == best]))
    assert res["ks"] == [1, 5] and res["bootstrap"]["n_boot"] == 200
    # the deepest layer of every run is fc10 (logged last), not fc2 (last by name)
    assert got["netprobe/reliance_auc@deepest"]["kendall_tau"] == got["netprobe/reliance_auc/fc10"]["kendall_tau"]
    assert set(got["netprobe/reliance_auc@deepest"]["keys"].values()) == {"netprobe/reliance_auc/fc10"}
    assert got["netprobe/reliance_auc@deepest"]["layer_source"] == ["logged"]


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
                       n_boot=20, boot_draws=10, cv=0)
    row = res["signals"][0]
    sig, acc = values(data, "netprobe/reliance_auc/fc1"), values(data, "test/acc")
    assert row["top_k"] == pytest.approx({str(k): v for k, v in top_k_hits(sig, acc, [1, 3], subset_size=4, n_draws=500).items()})
    assert row["top_k_random"] == pytest.approx({"1": 0.25, "3": 0.75})
    want = ref_bootstrap(sig, acc, [1, 3], n_boot=20, level=0.95, seed=0, subset_size=4, boot_draws=10)
    assert row["top_k_ci"]["3"] == pytest.approx(want["top_k"][3], abs=1e-9)
    with pytest.raises(SelectionError, match=r"below the subset size 10 \(10 runs ranked\).*k=10"):
        rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], top_k=[1, 10], cv=0)
    with pytest.raises(SelectionError, match=r"below the subset size 4 \(10 runs ranked, --subset-size 4\).*k=4"):
        rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], top_k=[4], subset_size=4, cv=0)
    with pytest.raises(SelectionError, match=r"below the subset size 10 \(10 runs ranked\)"):
        rank_runs(root, "netprobe/reliance_auc", against="test/acc", top_k=[10])
    with pytest.raises(SelectionError, match="Expected a direction for 'netprobe/new_metric'.*netprobe/new_metric:min"):
        rank_signals(root, "test/acc", signals=["netprobe/new_metric"])
    with pytest.raises(SelectionError, match="Expected a direction for 'train/loss'"):
        rank_signals(root, "test/acc", baselines=["train/loss"])
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
    thr = med - max(3 * 1.4826 * mad, 0.05)
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


def test_deepest_layer_from_the_logs(depth_sweep):
    root, vals = depth_sweep
    assert layer_order(load_run(str(root / "a")), "reliance_auc") == (["enc.0", "enc.1", "head"], "logged")
    assert layer_order(load_run(str(root / "b")), "reliance_auc") == (["enc.0", "enc.1", "head"], "logged")
    assert layer_order(load_run(str(root / "c")), "reliance_auc") == (["z", "y"], "layer_index")
    assert layer_order(load_run(str(root / "d")), "reliance_auc") == (["p", "q"], None)
    assert layer_order(load_run(str(root / "e")), "reliance_auc") == (["only"], "single")
    res = rank_runs(root, "netprobe/reliance_auc", layer="deepest")
    keys = {r["run"]: r["key"] for r in res["runs"]}
    assert keys == {"a": "netprobe/reliance_auc/head", "b": "netprobe/reliance_auc/head", "c": "netprobe/reliance_auc/y",
                    "e": "netprobe/reliance_auc/only"}
    assert {r["run"]: r["signal"] for r in res["runs"]}["c"] == pytest.approx(vals[("c", "y")])
    reason = {s["run"]: s["reason"] for s in res["skipped"]}["d"]
    assert "order of its 2 netprobe/reliance_auc/<layer> keys is not in its logs" in reason and "--layer NAME" in reason
    assert res["layer_source"] == ["layer_index", "logged", "single"]
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
    assert "netprobe/reliance_auc@deepest: deepest = the last layer the monitors logged" in text
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
    assert main(["rank", str(root), "--against", "test/acc", "--top-k", "10"]) == 2
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
    assert main(["rank", str(tmp_path), "--against", "test/acc", "--where", "test/acc>0.85"]) == 0
    out = capsys.readouterr().out
    assert "1 run ranked by" in out and "1 runs" not in out and "of 1\n" in out
    assert main(["rank", str(tmp_path), "--against", "test/acc", "--baseline", "train/loss:min", "--boot", "10"]) == 0
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
    cmd = f"{sys.executable} -m netprobe rank {tmp_path} --against test/acc --boot 0 | head -1"
    out = subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
    assert out.stdout.strip()
