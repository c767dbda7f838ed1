"""netprobe.select and the `netprobe rank` CLI on event files written here; statistics against scipy."""

import json
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
from netprobe.select import SelectionError, kendall_tau, rank_runs, spearman_rho, top_k_hits


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("seed", range(6))
def test_rank_correlations_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, 30).astype(float)  # many ties
    b = a + rng.integers(0, 4, 30)
    assert spearman_rho(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
    c = rng.normal(size=17)
    d = rng.normal(size=17)
    assert spearman_rho(c, d) == pytest.approx(stats.spearmanr(c, d).statistic, abs=1e-12)
    assert kendall_tau(c, d) == pytest.approx(stats.kendalltau(c, d).statistic, abs=1e-12)


_SPECIAL = [0.0, 1.0, 2.0, np.inf, -np.inf, np.nan]


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 12).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from(_SPECIAL) | st.integers(-3, 3).map(float), min_size=n, max_size=n),
    st.lists(st.sampled_from(_SPECIAL) | st.integers(-3, 3).map(float), min_size=n, max_size=n))))
def test_rank_correlations_match_scipy_on_ties_nan_and_inf(pair):
    """NaN anywhere gives NaN, infinities rank at the ends, ties and constant sides as scipy's."""
    a, b = pair
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_rho, want_tau = stats.spearmanr(a, b).statistic, stats.kendalltau(a, b).statistic
    for got, want in ((spearman_rho(a, b), want_rho), (kendall_tau(a, b), want_tau)):
        if np.isnan(want):
            assert np.isnan(got), (a, b, got)
        else:
            assert got == pytest.approx(want, abs=1e-12), (a, b)


def test_rank_correlations_refuse_sequences_of_other_lengths():
    for fn in (spearman_rho, kendall_tau):
        with pytest.raises(SelectionError, match="one length"):
            fn([1, 2, 3, 4], [1, 2, 3])


def test_top_k_hits_is_nan_with_a_nan_and_refuses_k_at_or_above_the_subset_size():
    assert np.isnan(top_k_hits([0.1, np.nan, 0.3], [1, 2, 3], [1])[1])
    for k in (3, 5):
        with pytest.raises(SelectionError, match="below the subset size 3"):
            top_k_hits([0.1, 0.2, 0.3], [1, 2, 3], [k])
    with pytest.raises(SelectionError, match="below the subset size 2"):
        top_k_hits([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4], [2], subset_size=2)


def test_top_k_hits_exact_and_resampled():
    sig = [0.9, 0.8, 0.1, 0.5]
    ref = [0.7, 0.9, 0.2, 0.3]  # the signal's pick (run 0) is 2nd by reference
    assert top_k_hits(sig, ref, [1, 2, 3]) == {1: 0.0, 2: 1.0, 3: 1.0}
    # subsets of 2: brute-force expectation over the 6 pairs
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    exact = np.mean([ref[max((i, j), key=lambda t: sig[t])] == max(ref[i], ref[j]) for i, j in pairs])
    est = top_k_hits(sig, ref, [1], subset_size=2, n_draws=20_000, seed=1)[1]
    assert est == pytest.approx(exact, abs=0.02)
    with pytest.raises(SelectionError, match="subset_size"):
        top_k_hits(sig, ref, [1], subset_size=9)


# ----------------------------------------------------------------------------- event files
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("sweep")
    curves = {  # reliance per epoch; test accuracy at the end
        "lr0.1": ([0.5, 0.6, 0.7], 0.90),
        "lr0.01": ([0.4, 0.8, 0.75], 0.95),
        "lr1": ([0.3, 0.2, 0.1], 0.40),
        "wd0": ([0.6, 0.65, 0.66], 0.92),
        "short": ([0.5], 0.5),  # stopped after epoch 0
    }
    for name, (vals, acc) in curves.items():
        with SummaryWriter(str(root / name)) as w:
            for epoch, v in enumerate(vals):
                step = 10 * (epoch + 1)
                w.add_scalar("netprobe/reliance_auc", v, step)
                w.add_scalar("epoch", epoch, step)
            w.add_scalar("test/acc", acc, 100)
            w.add_hparams({"lr": float(name[2:]) if name.startswith("lr") else 0.1, "tag": name}, {"hparam/test_acc": acc})
    with SummaryWriter(str(root / "nokey")) as w:
        w.add_scalar("train/loss", 1.0, 1)
    return root, curves


def test_rank_last_and_statistics(sweep):
    root, curves = sweep
    res = rank_runs(root, "netprobe/reliance_auc", against="test/acc")
    names = [r["run"] for r in res["runs"]]
    assert names == ["lr0.01", "lr0.1", "wd0", "short", "lr1"]  # by last value: .75 .7 .66 .5 .1
    assert [s["run"] for s in res["skipped"]] == ["nokey"]
    assert res["runs"][0]["hparams"]["tag"] == "lr0.01" and res["runs"][0]["hparams"]["lr"] == pytest.approx(0.01)
    sig = [curves[n][0][-1] for n in names]
    ref = [curves[n][1] for n in names]
    assert res["spearman_rho"] == pytest.approx(stats.spearmanr(sig, ref).statistic)
    assert res["kendall_tau"] == pytest.approx(stats.kendalltau(sig, ref).statistic)
    assert res["pick"] == "lr0.01" and res["pick_reference_rank"] == 1.0 and res["top_k"]["1"] == 1.0


def test_rank_best_and_epoch(sweep):
    root, _ = sweep
    best = rank_runs(root, "netprobe/reliance_auc", at="best")
    assert best["runs"][0]["run"] == "lr0.01" and best["runs"][0]["signal"] == pytest.approx(0.8)
    e1 = rank_runs(root, "netprobe/reliance_auc", at=1)
    assert [r["run"] for r in e1["runs"]][:2] == ["lr0.01", "wd0"]
    assert {s["run"]: s["reason"] for s in e1["skipped"]}["short"].startswith("stopped before epoch 1")
    low = rank_runs(root, "netprobe/reliance_auc", mode="min")
    assert low["pick"] == "lr1"


def test_errors(sweep, tmp_path):
    root, _ = sweep
    with pytest.raises(SelectionError, match="No runs under"):
        rank_runs(tmp_path, "netprobe/reliance_auc")
    with pytest.raises(SelectionError, match=r"No run logged 'netprobe/reliance'.*netprobe/reliance_auc"):
        rank_runs(root, "netprobe/reliance")
    with pytest.raises(SelectionError, match="not a directory"):
        rank_runs(tmp_path / "missing", "x")
    with pytest.raises(SelectionError, match="at"):
        rank_runs(root, "netprobe/reliance_auc", at="first")


def test_cli_table_json_and_errors(sweep, capsys):
    root, _ = sweep
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--top-k", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "lr0.01" in out and "spearman_rho" in out and "skipped  nokey" in out and "top-2" in out
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--json", "--at", "best", "--against", "hparam/test_acc"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["metric"] == "netprobe/reliance_auc" and doc["runs"][0]["run"] == "lr0.01"
    assert {"runs", "skipped", "spearman_rho", "kendall_tau", "top_k"} <= set(doc)
    assert main(["rank", str(root), "--metric", "netprobe/relaince_auc"]) == 2
    err = capsys.readouterr().err
    assert "No run logged" in err and "netprobe/reliance_auc" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--at", "-3"])


def test_cli_orients_a_known_reference_refuses_an_unknown_one_naming_flags_and_reports_moot_options(sweep, capsys):
    root, curves = sweep
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--against", "epoch", "--json"]) == 2
    err = capsys.readouterr().err
    assert "--against epoch:max" in err and "--against-mode" in err and "against_mode" not in err
    # a suffix orients any key
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--against", "epoch:min", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kendall_tau"] is not None
    # --where leaves one run: --subset-size and --top-k have nothing to act on, and the output says so
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--where", "test/acc>=0.94", "--subset-size", "3",
                 "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "ignored  --top-k: 1 run left to rank" in out and "ignored  --subset-size" in out


def test_python_dash_m_is_the_command(sweep):
    root, _ = sweep
    out = subprocess.run([sys.executable, "-m", "netprobe", "rank", str(root), "--metric", "netprobe/reliance_auc", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pick"] == "lr0.01"
    v = subprocess.run([sys.executable, "-m", "netprobe", "--version"], capture_output=True, text=True, timeout=60)
    assert v.stdout.startswith("netprobe ")
    script = Path(sys.executable).with_name("netprobe")  # the console script the package installs
    if script.exists():
        c = subprocess.run([str(script), "rank", str(root), "--metric", "netprobe/reliance_auc", "--json"], capture_output=True, text=True, timeout=120)
        assert c.returncode == 0 and json.loads(c.stdout) == json.loads(out.stdout)


def test_where_conditions_filter_and_explain(sweep, capsys):
    root, curves = sweep
    res = rank_runs(root, "netprobe/reliance_auc", against="test/acc", where=["test/acc>=0.85"])
    assert [r["run"] for r in res["runs"]] == ["lr0.01", "lr0.1", "wd0"]
    reasons = {s["run"]: s["reason"] for s in res["skipped"]}
    assert set(reasons) == {"lr1", "short", "nokey"}
    assert "test/acc=0.4 fails >= 0.85" in reasons["lr1"] and "no 'test/acc'" in reasons["nokey"]
    # at an epoch, conditions are read at that epoch: reliance at epoch 1 is .6 .8 .2 .65
    res = rank_runs(root, "netprobe/reliance_auc", at=1, where="netprobe/reliance_auc>0.61")
    assert [r["run"] for r in res["runs"]] == ["lr0.01", "wd0"]
    assert "stopped before epoch 1" in {s["run"]: s["reason"] for s in res["skipped"]}["short"]
    with pytest.raises(SelectionError, match="KEY OP NUMBER"):
        rank_runs(root, "netprobe/reliance_auc", where=["test/acc => 0.9"])
    with pytest.raises(SelectionError, match="No run logged 'test/accc'.*test/acc"):
        rank_runs(root, "netprobe/reliance_auc", where=["test/accc>=0.9"])
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--where", "test/acc>=0.85", "--where", "test/acc<0.94", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in doc["runs"]] == ["lr0.1", "wd0"] and doc["where"] == ["test/acc>=0.85", "test/acc<0.94"]


def test_ties_are_broken_at_random_in_expectation_not_by_name():
    # three runs tied for the best signal, references .9 .8 .7: a random pick is top-1 one time in 3
    sig, ref = [0.5, 0.5, 0.5, 0.1], [0.9, 0.8, 0.7, 0.6]
    assert top_k_hits(sig, ref, [1, 2, 3]) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    assert top_k_hits(sig[::-1], ref[::-1], [1, 2, 3]) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    # a pick tied by the reference with two others: in the top 1 with probability 1/3
    assert top_k_hits([0.9, 0.1, 0.2], [0.5, 0.5, 0.5], [1, 2]) == pytest.approx({1: 1 / 3, 2: 2 / 3})
    with pytest.raises(SelectionError, match="n_draws"):
        top_k_hits(sig, ref, [1], subset_size=2, n_draws=0)


def test_constant_signal_gives_null_correlations_and_valid_json(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    for name, acc in (("a", 0.9), ("b", 0.8), ("c", 0.7)):
        with SummaryWriter(str(tmp_path / name)) as w:
            w.add_scalar("netprobe/reliance_auc", 0.5, 1)
            w.add_scalar("test/acc", acc, 1)
    res = rank_runs(tmp_path, "netprobe/reliance_auc", against="test/acc")
    assert res["spearman_rho"] is None and res["kendall_tau"] is None
    assert res["pick_ties"] == ["a", "b", "c"] and res["pick_reference_rank"] == 2.0
    assert res["top_k"]["1"] == pytest.approx(1 / 3)
    assert main(["rank", str(tmp_path), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["spearman_rho"] is None and doc["pick_ties"] == ["a", "b", "c"]
    assert main(["rank", str(tmp_path), "--metric", "netprobe/reliance_auc", "--against", "test/acc"]) == 0
    assert "undefined" in capsys.readouterr().out


def test_best_among_measurements_meeting_the_conditions_and_diverged_runs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    nan = float("nan")
    runs = {  # (reliance, probe accuracy) per epoch
        "fits": [(1.0, 0.15), (0.8, 0.9), (0.85, 0.95)],  # 1.0 only while near chance
        "never": [(1.2, 0.1), (1.1, 0.2)],
        "diverged": [(0.9, 0.9), (nan, nan)],  # NaN: the monitor's value for a diverged network
    }
    for name, vals in runs.items():
        with SummaryWriter(str(tmp_path / name)) as w:
            for epoch, (rel, acc) in enumerate(vals):
                w.add_scalar("netprobe/reliance_auc", rel, 10 * (epoch + 1))
                w.add_scalar("netprobe/probe_accuracy", acc, 10 * (epoch + 1))
    res = rank_runs(tmp_path, "netprobe/reliance_auc", at="best", where=["netprobe/probe_accuracy>=0.5"])
    assert [(r["run"], round(r["signal"], 6)) for r in res["runs"]] == [("diverged", 0.9), ("fits", 0.85)]
    assert "no measurement of 'netprobe/reliance_auc' with netprobe/probe_accuracy>=0.5" in res["skipped"][0]["reason"]
    with SummaryWriter(str(tmp_path / "fits")) as w:  # a condition logged only at the end: its last value
        w.add_scalar("test/acc", 0.9, 100)
    res = rank_runs(tmp_path, "netprobe/reliance_auc", at="best", where=["test/acc>=0.5"])
    assert [(r["run"], round(r["signal"], 6)) for r in res["runs"]] == [("fits", 1.0)]
    res = rank_runs(tmp_path, "netprobe/reliance_auc")  # at the last value the diverged run has no signal
    assert [r["run"] for r in res["runs"]] == ["never", "fits"]
    assert {s["run"]: s["reason"] for s in res["skipped"]}["diverged"] == "non-finite signal"


def test_conditions_need_a_finite_number():
    from netprobe.select import parse_condition

    assert parse_condition("netprobe/probe_accuracy>=0.9") == ("netprobe/probe_accuracy", ">=", 0.9)
    for bad in ("netprobe/probe_accuracy>=nan", "x<inf"):
        with pytest.raises(SelectionError, match="a finite number"):
            parse_condition(bad)


def test_epochs_align_lightning_keys_monitor_keys_and_a_final_test(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    # as Lightning writes them: epoch-end metrics one step before the monitors' values, and
    # trainer.test() after fit logging test/acc with the next epoch number at the last step
    with SummaryWriter(str(tmp_path / "run")) as w:
        for e, (val, acc, rel) in enumerate([(0.3, 0.1, 1.2), (0.5, 0.6, 0.8), (0.4, 0.7, 0.9)]):
            w.add_scalar("val_acc", val, 5 * e + 4)
            w.add_scalar("epoch", e, 5 * e + 4)
            w.add_scalar("netprobe/probe_accuracy", acc, 5 * e + 5)
            w.add_scalar("netprobe/reliance_auc", rel, 5 * e + 5)
            w.add_scalar("epoch", e, 5 * e + 5)
        w.add_scalar("test/acc", 0.75, 15)
        w.add_scalar("epoch", 3, 15)
    res = rank_runs(tmp_path, "netprobe/reliance_auc", at=2, against="test/acc", where=["test/acc>=0.7"])
    assert [r["signal"] for r in res["runs"]] == [pytest.approx(0.9)]
    assert "stopped before epoch 3" in rank_runs(tmp_path, "netprobe/reliance_auc", at=3)["skipped"][0]["reason"]
    # best val_acc among epochs whose probe accuracy (logged one step later) is >= 0.5: epoch 1
    res = rank_runs(tmp_path, "val_acc", at="best", where=["netprobe/probe_accuracy>=0.5", "test/acc>0.7"])
    assert [r["signal"] for r in res["runs"]] == [pytest.approx(0.5)]
