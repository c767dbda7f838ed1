"""Strata of comparable runs in `netprobe rank`: runs of other monitored widths are ranked apart,
an across-strata pick only when asked, with the width confound; on event files written here."""

import json

import numpy as np
import pytest
from scipy import stats

from netprobe.cli import main
from netprobe.select import SelectionError, rank_runs, rank_signals


@pytest.fixture(scope="module")
def two_widths(tmp_path_factory):
    """12 runs, 6 of width 16 and 6 of width 256. Within each width the signal agrees with test
    accuracy; across widths it is confounded: the wide runs have a higher signal, a lower accuracy."""
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("two_widths")
    rng = np.random.default_rng(0)
    truth = {}
    for width, shift in ((16, 0.0), (256, 0.3)):
        for i in range(6):
            acc = 0.6 + 0.05 * i + (0.2 if width == 16 else 0.0) + 0.001 * rng.normal()
            sig = 0.2 + 0.05 * i + shift
            name = f"w{width}_s{i}"
            truth[name] = (width, sig, acc)
            with SummaryWriter(str(root / name)) as w:
                w.add_scalar("netprobe/reliance_auc", sig, 10)
                w.add_scalar("netprobe/layer_units/fc1", width, 10)
                w.add_scalar("netprobe/layer_units/fc2", 10, 10)
                w.add_scalar("netprobe/layer_index/fc1", 1, 10)
                w.add_scalar("netprobe/layer_index/fc2", 3, 10)
                w.add_scalar("test/acc", acc, 10)
                w.add_hparams({"width": width, "seed": i}, {"hparam/test_acc": acc})
    return root, truth


def test_two_widths_are_ranked_within_strata_and_no_pick_is_made_across(two_widths):
    root, truth = two_widths
    res = rank_runs(root, "netprobe/reliance_auc", against="test/acc", n_boot=50)
    assert [st["label"] for st in res["strata"]] == ["fc1:256 fc2:10", "fc1:16 fc2:10"]  # best signal's stratum first
    assert res["pick"] is None and res["kendall_tau"] is None and "--across" in res["not_comparable"]
    for st in res["strata"]:
        names = st["runs"]
        sig = [truth[n][1] for n in names]
        acc = [truth[n][2] for n in names]
        assert st["n_runs"] == 6 and {truth[n][0] for n in names} == {int(st["label"].split()[0].split(":")[1])}
        assert st["kendall_tau"] == pytest.approx(stats.kendalltau(sig, acc).statistic)
        assert st["pick"] == max(names, key=lambda n: truth[n][1])
    # across strata, on request: the pooled tau, and the confound (the signal rises with width)
    across = rank_runs(root, "netprobe/reliance_auc", against="test/acc", n_boot=0, across=True)
    names = [r["run"] for r in across["runs"]]
    assert across["kendall_tau"] == pytest.approx(stats.kendalltau([truth[n][1] for n in names], [truth[n][2] for n in names]).statistic)
    assert across["pick"] == "w256_s5" and across["confound"]["kendall_tau"] > 0.5


def test_within_refines_the_strata_by_a_hyperparameter(two_widths):
    root, _ = two_widths
    res = rank_runs(root, "netprobe/reliance_auc", against="test/acc", n_boot=0, within=["seed"])
    assert len(res["strata"]) == 12 and all(st["n_runs"] == 1 for st in res["strata"])
    with pytest.raises(SelectionError, match="hyperparameter 'depth'"):
        rank_runs(root, "netprobe/reliance_auc", within=["depth"])


def test_the_table_refuses_mixed_strata_unless_across(two_widths):
    root, _ = two_widths
    with pytest.raises(SelectionError, match=r"not comparable: they form 2 strata.*--across"):
        rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], cv=0, n_boot=0)
    res = rank_signals(root, "test/acc", signals=["netprobe/reliance_auc"], cv=0, n_boot=0, across=True)
    assert len(res["strata"]) == 2 and res["signals"][0]["confound"]["kendall_tau"] > 0.5


def test_cli_prints_the_strata_and_json_reports_them(two_widths, capsys):
    root, _ = two_widths
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--boot", "0"]) == 0
    out = capsys.readouterr().out
    assert "2 strata of comparable runs" in out and "fc1:16 fc2:10: 6 runs" in out and "no pick across strata" in out
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--boot", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [st["n_runs"] for st in doc["strata"]] == [6, 6]
    assert main(["rank", str(root), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--boot", "0", "--across"]) == 0
    assert "--across: ranked together" in capsys.readouterr().out
    assert main(["rank", str(root), "--against", "test/acc", "--signals", "all", "--cv", "0", "--boot", "0"]) == 2
    assert "--across" in capsys.readouterr().err


def test_runs_of_the_same_widths_but_other_module_types_are_other_strata(tmp_path):
    # the monitors log each layer's module type (netprobe/layer_type/<layer>/<Type>): a GELU network
    # and a ReLU network of the same widths are not compared unless asked
    from torch.utils.tensorboard import SummaryWriter

    from netprobe.select import load_runs
    from netprobe.select.strata import layer_types, stratum_labels

    for act in ("ReLU", "GELU"):
        for i in range(3):
            with SummaryWriter(str(tmp_path / f"{act}_{i}")) as w:
                w.add_scalar("netprobe/reliance_auc", 0.5 + 0.1 * i, 1)
                w.add_scalar("netprobe/layer_units/act1", 64, 1)
                w.add_scalar(f"netprobe/layer_type/act1/{act}", 1.0, 1)
                w.add_scalar("test/acc", 0.5 + 0.1 * i, 1)
    runs = sorted(load_runs(str(tmp_path)), key=lambda r: r.name)
    assert layer_types(runs[0]) == {"act1": "GELU"} and layer_types(runs[-1]) == {"act1": "ReLU"}
    labels = stratum_labels(runs)
    assert {labels[r.name] for r in runs} == {"act1(GELU):64", "act1(ReLU):64"}
    res = rank_runs(str(tmp_path), "netprobe/reliance_auc", against="test/acc", n_boot=0)
    assert sorted(s["label"] for s in res["strata"]) == ["act1(GELU):64", "act1(ReLU):64"], res["strata"]
    assert res["pick"] is None  # no pick across strata unless asked


def test_a_glob_over_netprobe_keys_leaves_the_fact_keys_out(two_widths):
    # netprobe/layer_units/<layer> and layer_index/<layer> are facts of the model, never signals
    root, _ = two_widths
    res = rank_signals(str(root), "test/acc", signals=["netprobe/*"], n_boot=0, cv=0, across=True)
    names = [r["signal"] for r in res["signals"]]
    assert names == ["netprobe/reliance_auc"], names
    assert res["not_evaluated"] == [], res["not_evaluated"]  # not listed as signals of unknown direction either
