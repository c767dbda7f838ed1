"""A sweep in TensorBoard's HParams tab, read back from a real `tensorboard` server: every scalar a
run logs is a metric (netprobe's means and bests first, then the per-layer keys, then the run's
own), `hp_metric` is netprobe's lead signal (not Lightning's -1 placeholder), and the
custom-scalars layout has one line per run in each mean's chart."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
pytest.importorskip("tensorboard")

from lightning_helpers import digits, loader, make_module, trainer  # noqa: E402
from netprobe.lightning import ConvergenceMonitor, RelianceEarlyStopping, RelianceMonitor, SelectivityMonitor  # noqa: E402
from netprobe.lightning._tensorboard import _DEFAULT_HP_METRIC, hparams_metric_order  # noqa: E402

_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def _sweep_module(lr, width, held_out):
    class Swept(type(make_module(pl))):
        def __init__(self):
            super().__init__(dropout=0.0, batchnorm=False, lr=lr, width=width)
            self.save_hyperparameters({"lr": lr, "width": width})

        def training_step(self, batch, i):
            loss = super().training_step(batch, i)
            self.log("train/loss", loss, on_step=False, on_epoch=True)
            return loss

        def on_train_epoch_end(self):
            x, y = held_out
            with torch.no_grad():
                self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    return Swept()


def _post_json(url, obj):
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read().decode())


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read().decode())


def _serve(logdir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tb = Path(sys.executable).with_name("tensorboard")
    cmd = [str(tb)] if tb.exists() else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen(cmd + ["--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def _experiment(proc, base, runs):
    """The HParams experiment once the server has read the ``runs`` sessions."""
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tensorboard exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            groups = _post_json(f"{base}/data/plugin/hparams/session_groups", {
                "experimentName": "", "allowedStatuses": _STATUSES, "colParams": [], "startIndex": 0, "sliceSize": 10})
            if len(groups.get("sessionGroups", [])) >= runs:
                return _post_json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        except OSError:
            pass
        time.sleep(1.0)
    pytest.fail("tensorboard did not serve the sweep's sessions in 90 s")


@pytest.mark.slow
def test_a_sweeps_hparams_lists_every_scalar_and_hp_metric_is_netprobes(tmp_path):
    x, y = digits(260)
    held_out = (x[200:], y[200:])
    finals = {}
    for lr, width in ((1e-2, 16), (3e-2, 24)):
        torch.manual_seed(0)
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name=f"lr{lr}_w{width}", version="")
        mons = [RelianceMonitor(["relu1", "relu2"], num_samples=64, repeats=1), SelectivityMonitor(["relu1"], num_samples=64),
                ConvergenceMonitor(["relu1"], num_samples=64)]
        t = trainer(pl, max_epochs=2, logger=logger, callbacks=mons)
        t.fit(_sweep_module(lr, width, held_out), loader(x[:200], y[:200]))
        assert getattr(logger, _DEFAULT_HP_METRIC) is True  # given back after Lightning logged the hyperparameters
        finals[f"lr{lr}_w{width}"] = float(t.callback_metrics["netprobe/reliance_auc"])
        logger.experiment.flush()

    proc, base = _serve(tmp_path)
    try:
        exp = _experiment(proc, base, runs=2)
        tags = [m["name"]["tag"] for m in exp["metricInfos"]]
        # netprobe's means and bests first (reliance leading), then the per-layer keys, then the run's own
        per_layer = [i for i, k in enumerate(tags) if k.startswith("netprobe/") and not k.startswith("netprobe/best/") and k.count("/") > 1]
        means = tags[:per_layer[0]]
        assert means[:3] == ["netprobe/best/reliance_auc", "netprobe/reliance_auc", "netprobe/best/reliance_area"], means
        assert {"netprobe/selectivity_mean", "netprobe/cka_prev", "netprobe/probe_accuracy"} <= set(means)
        assert all(k.count("/") == 1 or k.startswith("netprobe/best/") for k in means)
        layer_keys = [k for k in tags if k.startswith("netprobe/") and k not in means]
        assert {"netprobe/reliance_auc/relu1", "netprobe/reliance_auc/relu2", "netprobe/selectivity_mean/relu1"} <= set(layer_keys)
        own = tags[len(means) + len(layer_keys):]
        assert own[0] == "hp_metric" and {"train/loss", "test/acc"} <= set(own), tags
        assert not any(k.startswith("netprobe/") for k in own)
        assert not any(k.startswith(("netprobe/time/", "netprobe/layer_index/", "netprobe/layer_units/", "netprobe/layer_type/"))
                       for k in tags)
        assert tags == hparams_metric_order([k for k in tags if k.startswith("netprobe/")], own)
        assert {h["name"] for h in exp["hparamInfos"]} >= {"lr", "width"}

        groups = _post_json(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": _STATUSES, "startIndex": 0, "sliceSize": 10,
            "colParams": [{"metric": {"tag": t}} for t in ("hp_metric", "netprobe/reliance_auc", "test/acc", "train/loss")]})
        assert len(groups["sessionGroups"]) == 2
        for g in groups["sessionGroups"]:
            values = {mv["name"]["tag"]: mv["value"] for mv in g["metricValues"]}
            assert set(values) >= {"hp_metric", "netprobe/reliance_auc", "test/acc", "train/loss"}, values
            assert values["hp_metric"] != -1 and values["hp_metric"] == pytest.approx(values["netprobe/reliance_auc"])
            assert 0 <= values["test/acc"] <= 1
        got = sorted(mv["value"] for g in groups["sessionGroups"] for mv in g["metricValues"] if mv["name"]["tag"] == "hp_metric")
        assert got == pytest.approx(sorted(finals.values()), abs=1e-6)

        # the custom-scalars layout: a mean's chart has one line per run; per-layer charts apart
        layout = _get(f"{base}/data/plugin/custom_scalars/layout")
        charts = {c["title"]: {ch["title"]: ch["multiline"]["tag"] for ch in c["chart"]} for c in layout["category"]}
        assert {"netprobe", "netprobe best so far", "netprobe per layer", "netprobe time"} <= set(charts)
        assert "probe_accuracy per layer" not in charts["netprobe per layer"]  # a model-level metric
        for chart, expect in ((charts["netprobe"]["reliance_auc"], {"netprobe/reliance_auc"}),
                              (charts["netprobe best so far"]["best/reliance_auc"], {"netprobe/best/reliance_auc"}),
                              (charts["netprobe per layer"]["reliance_auc per layer"],
                               {"netprobe/reliance_auc/relu1", "netprobe/reliance_auc/relu2"})):
            lines = set()
            for run in finals:
                served = _get(f"{base}/data/plugin/custom_scalars/scalars?run={urllib.parse.quote(run)}&tag="
                              + urllib.parse.quote(chart[0]))
                assert served["regex_valid"]
                lines |= {(run, t) for t in served["tag_to_events"]}
            assert lines == {(r, t) for r in finals for t in expect}, lines
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_hp_metric_follows_the_early_stopping_key_and_no_placeholder_is_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = digits(160)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version="")
    mons = [RelianceMonitor(["relu1"], num_samples=48, repeats=1), SelectivityMonitor(["relu1"], num_samples=48)]
    stop = RelianceEarlyStopping("netprobe/selectivity_mean", mode="min", warmup_epochs=0)
    trainer(pl, max_epochs=2, logger=logger, callbacks=mons + [stop]).fit(make_module(pl), loader(x, y))
    logger.experiment.flush()
    ea = EventAccumulator(logger.log_dir)
    ea.Reload()
    hp = [e.value for e in ea.Scalars("hp_metric")]
    assert hp == pytest.approx([e.value for e in ea.Scalars("netprobe/selectivity_mean")]) and -1 not in hp


def test_lightnings_placeholder_flag_is_where_netprobe_holds_it_back():
    # netprobe turns the TensorBoardLogger's `default_hp_metric` off for the fit's hyperparameter
    # logging (so the HParams experiment written at on_train_end is the run's first): the attribute
    # it sets must be the one Lightning reads, in both packages
    import inspect

    loggers = [pl.loggers.TensorBoardLogger]
    try:
        import lightning.pytorch as lpt

        loggers.append(lpt.loggers.TensorBoardLogger)
    except ImportError:  # pragma: no cover
        pass
    for cls in loggers:
        src = "".join(inspect.getsource(k) for k in cls.__mro__ if k.__module__.split(".")[0] in ("pytorch_lightning", "lightning", "lightning_fabric"))
        assert f"self.{_DEFAULT_HP_METRIC} = default_hp_metric" in src and f"if self.{_DEFAULT_HP_METRIC}:" in src, cls
