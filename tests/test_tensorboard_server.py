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


@pytest.mark.slow
def test_tensorboard_serves_scalars_histograms_and_images(tmp_path):
    torch.manual_seed(0)
    x, y = digits(200)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    mons = [SelectivityMonitor(["relu1", "relu2"], num_samples=64), RelianceMonitor(["relu1"], num_samples=64, repeats=1),
            ConvergenceMonitor(["relu1", "relu2"], num_samples=96, heatmap=True)]
    trainer(pl, max_epochs=2, logger=logger, callbacks=mons).fit(make_module(pl), loader(x, y))
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
