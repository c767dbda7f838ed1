"""End to end: a short training run writes TensorBoard logs; a real `tensorboard` server serves
the netprobe scalars, the selectivity histograms and the figures through its HTTP data API."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

from lightning_helpers import digits, loader, make_module, trainer  # noqa: E402
from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read().decode())


def _post(url, data=b""):
    req = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read().decode())


def _post_json(url, obj):
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read().decode())


@pytest.mark.slow
def test_tensorboard_serves_scalars_histograms_and_images(tmp_path):
    torch.manual_seed(0)
    x, y = digits(200)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    mons = [SelectivityMonitor(["relu1", "relu2"], num_samples=64), RelianceMonitor(["relu1"], num_samples=64, repeats=1),
            ConvergenceMonitor(["relu1", "relu2"], num_samples=96, heatmap=True)]

    class WithHparams(type(make_module(pl))):
        def __init__(self):
            super().__init__(dropout=0.2, batchnorm=True, lr=1e-2, width=32)
            self.save_hyperparameters({"lr": 1e-2, "width": 32})

    trainer(pl, max_epochs=2, logger=logger, callbacks=mons).fit(WithHparams(), loader(x, y))
    logger.experiment.flush()

    port = _free_port()
    tb = Path(sys.executable).with_name("tensorboard")
    cmd = [str(tb)] if tb.exists() else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen(cmd + ["--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, scalars = time.time() + 90, {}
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                scalars = _get(f"{base}/data/plugin/scalars/tags")
                if any("netprobe/selectivity_mean" in tags for tags in scalars.values()):
                    break
            except OSError:
                pass
            time.sleep(1.0)
        tags = {t for run in scalars.values() for t in run}
        for key in ("netprobe/selectivity_mean", "netprobe/selectivity_mean/relu1", "netprobe/reliance_auc",
                    "netprobe/cka_prev", "netprobe/time/RelianceMonitor"):
            assert key in tags, (key, sorted(tags))
        run = next(r for r, t in scalars.items() if "netprobe/reliance_auc" in t)
        series = _get(f"{base}/data/plugin/scalars/scalars?run={urllib.request.quote(run)}&tag=netprobe/reliance_auc")
        assert len(series) == 2 and all(0 <= v <= 1.5 for _, _, v in series)
        hist = {t for r in _get(f"{base}/data/plugin/histograms/tags").values() for t in r}
        assert {"netprobe/selectivity/relu1", "netprobe/selectivity/relu2"} <= hist
        images = {t for r in _get(f"{base}/data/plugin/images/tags").values() for t in r}
        assert "netprobe/reliance_curves" in images and "netprobe/cka_layers" in images
        # media at the first measurement and at the last epoch (media_every=10 > 2 epochs)
        imgs = _get(f"{base}/data/plugin/images/images?run={urllib.request.quote(run)}&tag=netprobe/cka_layers&sample=0")
        assert len(imgs) == 2, imgs

        # the custom-scalars layout: one chart per metric of its mean, bests and per-layer lines apart
        layout = _get(f"{base}/data/plugin/custom_scalars/layout")
        cats = {c["title"]: {ch["title"]: ch["multiline"]["tag"] for ch in c["chart"]} for c in layout["category"]}
        charts = cats["netprobe"]
        assert {"reliance_auc", "reliance_area", "probe_accuracy", "selectivity_mean", "cka_prev"} <= set(charts)
        import re
        assert {t for t in tags if re.match(charts["reliance_auc"][0], t)} == {"netprobe/reliance_auc"}
        best = cats["netprobe best so far"]["best/reliance_auc"][0]
        assert {t for t in tags if re.match(best, t)} == {"netprobe/best/reliance_auc"}
        matched = {t for t in tags if re.match(cats["netprobe per layer"]["reliance_auc per layer"][0], t)}
        assert matched == {"netprobe/reliance_auc/relu1"}, matched
        served = _get(f"{base}/data/plugin/custom_scalars/scalars?run={urllib.request.quote(run)}&tag="
                      + urllib.request.quote(cats["netprobe per layer"]["selectivity_mean per layer"][0]))
        assert served["regex_valid"] and set(served["tag_to_events"]) == {
            "netprobe/selectivity_mean/relu1", "netprobe/selectivity_mean/relu2"}, served

        # the HParams tab: the run's hyperparameters, the netprobe keys and the run's own as its metrics
        exp = _post_json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        metric_tags = {m["name"]["tag"] for m in exp["metricInfos"]}
        assert {"netprobe/reliance_auc", "netprobe/best/reliance_auc", "netprobe/reliance_area/relu1",
                "netprobe/cka_prev"} <= metric_tags, metric_tags
        assert "hp_metric" in metric_tags  # netprobe's lead signal, not Lightning's placeholder (tests/lightning/test_hparams_metrics.py)
        assert {h["name"] for h in exp["hparamInfos"]} >= {"lr"}
        groups = _post_json(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": "netprobe/reliance_auc"}}], "startIndex": 0, "sliceSize": 10})
        values = [mv for g in groups["sessionGroups"] for mv in g["metricValues"]]
        final = series[-1][2]
        assert any(abs(mv["value"] - final) < 1e-6 for mv in values if mv["name"]["tag"] == "netprobe/reliance_auc"), values
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_netprobe_scalars_share_the_step_of_lightnings_epoch_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Logged(type(make_module(pl))):
        def training_step(self, batch, i):
            loss = super().training_step(batch, i)
            self.log("train/epoch_loss", loss, on_step=False, on_epoch=True)
            return loss

    x, y = digits(200)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    trainer(pl, max_epochs=3, logger=logger, callbacks=[SelectivityMonitor(["relu1"], num_samples=64)]).fit(Logged(), loader(x, y))
    ea = EventAccumulator(logger.log_dir)
    ea.Reload()
    ours = [e.step for e in ea.Scalars("netprobe/selectivity_mean")]
    theirs = [e.step for e in ea.Scalars("train/epoch_loss")]
    assert len(ours) == 3 and ours == theirs


def test_layer_index_gives_the_forward_order_that_rank_reads_as_deepest(tmp_path):
    # a model that registers its layers in another order than it calls them: `late` (registered
    # first) runs last; netprobe/layer_index/<layer> gives the forward order, and `netprobe rank
    # --layer deepest` reads it
    from torch import nn

    from netprobe.select import layer_order, load_runs

    base = type(make_module(pl))

    class Reordered(base):
        def __init__(self):
            super().__init__(dropout=0.0, batchnorm=False, lr=1e-2, width=16)
            self.late = nn.ReLU()  # registered before `early`, called after it
            self.early = nn.ReLU()

        def forward(self, x):
            return super().forward(self.late(self.early(x) + 0.0) + 0.0)

    x, y = digits(120)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    mons = [RelianceMonitor(["late", "early"], num_samples=48, repeats=1), SelectivityMonitor(["early"], num_samples=48)]
    t = trainer(pl, max_epochs=2, logger=logger, callbacks=mons)
    t.fit(Reordered(), loader(x, y))
    logger.experiment.flush()
    (run,) = load_runs(str(tmp_path))
    idx = {k.rsplit("/", 1)[1]: v for k in run.scalars if k.startswith("netprobe/layer_index/") for v in [run.scalars[k][-1][1]]}
    assert idx["early"] < idx["late"], idx
    layers, source = layer_order(run, "reliance_auc")
    assert layers == ["early", "late"] and source == "layer_index"
    # logged once per fit, beside the other keys, not in the HParams metrics
    assert all(len(run.scalars[f"netprobe/layer_index/{n}"]) == 1 for n in ("early", "late"))
    # and each layer's units (the digits' 64 features pass through both ReLUs), what strata are formed of
    from netprobe.select.strata import stratum_labels

    assert {n: run.scalars[f"netprobe/layer_units/{n}"] for n in ("early", "late")} == {"early": [(run.scalars["netprobe/layer_units/early"][0][0], 64.0)], "late": [(run.scalars["netprobe/layer_units/late"][0][0], 64.0)]}
    assert stratum_labels([run]) == {run.name: "early(ReLU):64 late(ReLU):64"}
    assert [len(run.scalars[f"netprobe/layer_type/{n}/ReLU"]) for n in ("early", "late")] == [1, 1]


def test_an_early_stopped_run_gets_the_media_of_its_last_measurement(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = digits(160)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    rel = RelianceMonitor(["relu1"], num_samples=48, repeats=1, media_every=1000)
    # stops after the first non-improving measurement (a high min_delta: every epoch fails it)
    stop = pl.callbacks.EarlyStopping(monitor="netprobe/reliance_auc", mode="max", patience=1, min_delta=1.0,
                                      check_on_train_epoch_end=True)
    t = trainer(pl, max_epochs=30, logger=logger, callbacks=[rel, stop])
    t.fit(make_module(pl), loader(x, y))
    assert 0 < stop.stopped_epoch < 29  # stopped early, not at max_epochs
    logger.experiment.flush()
    ea = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    ea.Reload()
    img_steps = [e.step for e in ea.Images("netprobe/reliance_curves")]
    scalar_steps = [e.step for e in ea.Scalars("netprobe/reliance_auc")]
    assert img_steps == [scalar_steps[0], scalar_steps[-1]], (img_steps, scalar_steps)
    assert len(ea.Scalars("netprobe/reliance_auc")) == stop.stopped_epoch + 1  # no extra scalar point
