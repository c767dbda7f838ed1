"""Every bad input ends in the right value or a clear error naming the problem and the fix."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from netprobe.metrics.similarity import SimilarityAccumulator, cca, linear_cka, pwcca, svcca

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- 1. debiased CKA
def _hsic_unbiased_song(k, l_):
    """Song et al. (2012), eq. 5, written from the paper: K~, L~ are the Gram matrices with zeroed
    diagonals; HSIC_1 = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def _cka_debiased_numpy(x, y):
    """Debiased linear CKA (Kornblith et al. 2019): unbiased HSIC of the linear kernels, uncentered
    (the estimator is invariant to adding constants), normalized as CKA."""
    k, l_ = x @ x.T, y @ y.T
    return _hsic_unbiased_song(k, l_) / np.sqrt(_hsic_unbiased_song(k, k) * _hsic_unbiased_song(l_, l_))


@pytest.mark.parametrize("n,dx,dy,seed", [(60, 5, 7, 0), (40, 3, 2, 1), (12, 40, 50, 2), (200, 8, 8, 3)])
def test_debiased_cka_is_the_unclipped_estimate(n, dx, dy, seed):
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(6):  # independent representations: the estimate scatters around 0
        x, y = rng.normal(size=(n, dx)) + 2.0, rng.normal(size=(n, dy)) - 1.0
        ref = _cka_debiased_numpy(x, y)
        got = float(linear_cka(torch.tensor(x), torch.tensor(y), debiased=True))
        assert got == pytest.approx(ref, abs=1e-12, rel=1e-10)
        values.append(got)
    assert min(values) < 0.0  # was clipped to 0.0 before


def test_debiased_cka_is_at_most_one_and_exact_for_identical_inputs():
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = float(linear_cka(x, 2 * x + 1, debiased=True))
    assert v <= 1.0 and v == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- 2. no samples
@pytest.mark.parametrize("fn", [cca, svcca, pwcca, linear_cka, lambda x, y: linear_cka(x, y, debiased=True)])
def test_zero_samples_say_so(fn):
    with pytest.raises(ValueError, match=r"n=0") as err:
        fn(torch.zeros(0, 3), torch.zeros(0, 4))
    assert "overflow" not in str(err.value)


def test_zero_samples_accumulator_says_so():
    acc = SimilarityAccumulator().update(torch.zeros(0, 3), torch.zeros(0, 4))
    for method in ("cca", "svcca", "pwcca", "linear_cka"):
        with pytest.raises(ValueError, match=r"no samples, n=0") as err:
            getattr(acc, method)()
        assert "overflow" not in str(err.value)


# ----------------------------------------------------------------------------- 3. netprobe rank
def _write_run(path, values, acc):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(path)) as w:
        for epoch, v in enumerate(values):
            w.add_scalar("netprobe/reliance_auc", v, 10 * (epoch + 1))
            w.add_scalar("epoch", epoch, 10 * (epoch + 1))
        w.add_scalar("test/acc", acc, 100)


def _event_file(run_dir):
    (f,) = [p for p in Path(run_dir).iterdir() if p.name.startswith("events.out.tfevents")]
    return f


@pytest.fixture()
def sweep(tmp_path):
    runs = {"a": ([0.5, 0.6, 0.9], 0.95), "b": ([0.5, 0.7, 0.6], 0.90), "c": ([0.4, 0.3, 0.2], 0.50)}
    for name, (vals, acc) in runs.items():
        _write_run(tmp_path / name, vals, acc)
    return tmp_path


def test_a_flipped_byte_skips_the_run_with_the_reason(sweep):
    from netprobe.select import rank_runs

    f = _event_file(sweep / "a")
    data = bytearray(f.read_bytes())
    # flip a byte inside the last reliance record (the value 0.9): tensorboard's reader stops there
    # silently, which ranked run "a" by its earlier value 0.6
    pos = data.rfind(b"netprobe/reliance_auc") + len("netprobe/reliance_auc") + 3
    data[pos] ^= 0xFF
    f.write_bytes(bytes(data))
    res = rank_runs(sweep, "netprobe/reliance_auc", against="test/acc")
    assert [r["run"] for r in res["runs"]] == ["b", "c"]
    (skip,) = res["skipped"]
    assert skip["run"] == "a" and "corrupt record" in skip["reason"] and f.name in skip["reason"]


def test_a_truncated_file_skips_the_run(sweep):
    from netprobe.select import rank_runs

    f = _event_file(sweep / "b")
    f.write_bytes(f.read_bytes()[:-7])
    res = rank_runs(sweep, "netprobe/reliance_auc")
    assert [s["run"] for s in res["skipped"]] == ["b"] and "truncated record" in res["skipped"][0]["reason"]


def test_garbage_event_files_say_no_readable_event_data(tmp_path, capsys):
    from netprobe.cli import main
    from netprobe.select import SelectionError, rank_runs

    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "events.out.tfevents.123.host").write_bytes(os.urandom(300))
    with pytest.raises(SelectionError, match="No readable event data was found") as err:
        rank_runs(tmp_path, "netprobe/reliance_auc")
    assert "Closest keys" not in str(err.value) and "r1" in str(err.value)
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "events.out.tfevents.124.host").write_bytes(b"")
    assert main(["rank", str(tmp_path), "--metric", "netprobe/reliance_auc"]) == 2
    assert "No readable event data" in capsys.readouterr().err


def test_against_mode_min_orients_agreement_positive(tmp_path):
    from netprobe.select import rank_runs

    # the signal's order agrees perfectly with a lower-is-better reference (a loss)
    for name, sig, loss in (("a", 0.9, 0.1), ("b", 0.7, 0.2), ("c", 0.5, 0.3), ("d", 0.2, 0.8)):
        _write_run(tmp_path / name, [sig], loss)
    res = rank_runs(tmp_path, "netprobe/reliance_auc", against="test/acc", against_mode="min")
    assert res["spearman_rho"] == pytest.approx(1.0) and res["kendall_tau"] == pytest.approx(1.0)
    both_min = rank_runs(tmp_path, "netprobe/reliance_auc", mode="min", against="test/acc", against_mode="min")
    assert both_min["spearman_rho"] == pytest.approx(-1.0)  # the signal now prefers the worst runs
    assert res["pick_reference_rank"] == 1.0 and res["top_k"]["1"] == 1.0


def test_top_k_at_or_above_the_number_of_runs_is_refused(sweep, capsys):
    from netprobe.cli import main
    from netprobe.select import SelectionError, rank_runs

    with pytest.raises(SelectionError, match=r"below the subset size 3 \(3 runs ranked\).*k=3"):
        rank_runs(sweep, "netprobe/reliance_auc", against="test/acc", top_k=[1, 3])
    assert main(["rank", str(sweep), "--metric", "netprobe/reliance_auc", "--against", "test/acc", "--top-k", "1,5"]) == 2
    assert "k=5" in capsys.readouterr().err
    res = rank_runs(sweep, "netprobe/reliance_auc", against="test/acc")  # default: the k of 1,5,10 below 3
    assert list(res["top_k"]) == ["1"]


def test_plurals(tmp_path, capsys):
    from netprobe.cli import main

    _write_run(tmp_path / "only", [0.5], 0.9)
    assert main(["rank", str(tmp_path), "--metric", "netprobe/reliance_auc", "--against", "test/acc"]) == 0
    out = capsys.readouterr().out
    assert "1 run ranked" in out and "1 runs" not in out


# ----------------------------------------------------------------------------- 4. early stopping keys
pl = pytest.importorskip("pytorch_lightning")


def _trainer_fit(callbacks, max_epochs=1):
    from lightning_helpers import digits, loader, make_module, trainer

    x, y = digits(120)
    tr = trainer(pl, max_epochs=max_epochs, callbacks=callbacks, limit_train_batches=2)
    steps = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *a):
            steps.append(1)

    tr.callbacks.append(Count())
    tr.fit(make_module(pl), loader(x, y))
    return steps


def test_misspelled_monitor_key_is_refused_before_the_first_step():
    from netprobe.lightning import RelianceEarlyStopping, RelianceMonitor

    steps = []
    with pytest.raises(ValueError, match=r"'netprobe/relaince_auc'.*Closest: \['netprobe/reliance_auc'"):
        steps = _trainer_fit([RelianceMonitor(["relu1"], num_samples=32, repeats=1),
                              RelianceEarlyStopping("netprobe/relaince_auc")])
    assert steps == []


def test_layer_keys_and_foreign_keys_are_accepted():
    from netprobe.lightning import RelianceEarlyStopping, RelianceMonitor

    # the early stopping set up before the monitor (callback order) still sees the monitor's layers
    _trainer_fit([RelianceEarlyStopping("netprobe/reliance_auc/relu1"), RelianceMonitor(["relu1"], num_samples=32, repeats=1)])
    _trainer_fit([RelianceMonitor(["relu1"], num_samples=32, repeats=1), RelianceEarlyStopping("train_loss")])


def test_min_probe_accuracy_without_a_reliance_monitor_is_refused_at_setup():
    from netprobe.lightning import RelianceEarlyStopping, SelectivityMonitor

    with pytest.raises(ValueError, match=r"min_probe_accuracy.*add a RelianceMonitor"):
        _trainer_fit([SelectivityMonitor(["relu1"], num_samples=32),
                      RelianceEarlyStopping("netprobe/selectivity_mean", min_probe_accuracy=0.5)])


def test_no_netprobe_monitor_warns():
    from netprobe.lightning import RelianceEarlyStopping

    with pytest.warns(UserWarning, match="no netprobe monitor is attached"):
        _trainer_fit([RelianceEarlyStopping()])


# ----------------------------------------------------------------------------- 5. packaging
def test_torch_has_no_upper_bound_in_the_metadata():
    import tomllib  # python >= 3.11

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if d.replace(" ", "").startswith("torch>") or d.strip() == "torch"]
    assert "<" not in torch_dep
    assert "torch==" in (ROOT / "constraints.txt").read_text()
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


# ----------------------------------------------------------------------------- 6. python -m from above a clone
def test_python_m_netprobe_from_the_directory_above_a_clone(tmp_path, sweep):
    (tmp_path / "above").mkdir()
    (tmp_path / "above" / "netprobe").symlink_to(ROOT, target_is_directory=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    for args in (["--version"], ["rank", str(sweep), "--metric", "netprobe/reliance_auc", "--json"]):
        p = subprocess.run([sys.executable, "-m", "netprobe", *args], cwd=tmp_path / "above", env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["pick"] == "a"
