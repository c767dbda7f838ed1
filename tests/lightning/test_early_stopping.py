"""RelianceEarlyStopping with a real Trainer fed a scripted signal."""

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from netprobe.lightning.early_stopping import RelianceEarlyStopping  # noqa: E402


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.fc(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Script(pl.Callback):
    """Writes values[epoch] (or nothing, for None) as the monitored key at each epoch end."""

    def __init__(self, values, fit=None):
        self.values, self.fit = values, fit

    def on_train_epoch_end(self, trainer, pl_module):
        v = self.values[trainer.current_epoch]
        if v is not None:
            trainer.callback_metrics["netprobe/reliance_auc"] = torch.tensor(v)
            if self.fit is not None:
                trainer.callback_metrics["netprobe/probe_accuracy"] = torch.tensor(self.fit[trainer.current_epoch])


def _loader():
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(8, 2, generator=g), torch.randint(0, 2, (8,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=4)


def _fit(values, stop, fit=None):
    trainer = pl.Trainer(max_epochs=len(values), callbacks=[Script(values, fit), stop], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), _loader())
    return trainer


def _expected_stop(values, patience, beta=0.0, warmup=0, fit=None, min_fit=None):
    """Independent re-statement: EMA over fresh values, patience counted in measurements."""
    best, wait, ema = -float("inf"), 0, None
    for epoch, v in enumerate(values):
        if v is None:
            continue
        ema = v if ema is None or beta == 0 else beta * ema + (1 - beta) * v
        if epoch < warmup or (min_fit is not None and fit[epoch] < min_fit):
            continue
        if ema > best:
            best, wait = ema, 0
        else:
            wait += 1
            if wait >= patience:
                return epoch
    return None


@pytest.mark.parametrize(
    "values,patience,beta,warmup",
    [
        ([0.5, 0.6, 0.7, 0.65, 0.64, 0.66, 0.63, 0.9, 0.9, 0.9], 3, 0.0, 0),
        ([0.9, None, 0.8, None, 0.85, None, 0.95, None, 0.7, None, 0.6, None], 2, 0.0, 0),  # every 2nd epoch
        ([0.2, 0.9, 0.5, 0.6, 0.55, 0.58, 0.5, 0.4, 0.3, 0.2], 2, 0.6, 2),
    ],
)
def test_stops_at_the_epoch_the_values_imply(values, patience, beta, warmup):
    stop = RelianceEarlyStopping(patience=patience, smoothing=beta, warmup_epochs=warmup)
    trainer = _fit(values, stop)
    expected = _expected_stop(values, patience, beta, warmup)
    assert expected is not None
    assert stop.stopped_epoch == expected
    assert trainer.current_epoch == expected + 1  # Lightning increments after the stopping epoch
    fresh = [v for v in values if v is not None]
    assert [h[1] for h in stop.history] == pytest.approx(fresh[: len(stop.history)])


def test_min_probe_accuracy_ignores_records_until_the_network_fits():
    # an underfit network scores high and reliance falls while it learns: without the fit gate the
    # rule stops at once; with it, only records at probe accuracy >= 0.9 count
    values = [0.95, 0.9, 0.85, 0.8, 0.82, 0.84, 0.83, 0.81, 0.8, 0.79, 0.78, 0.77]
    fit = [0.2, 0.5, 0.7, 0.85, 0.9, 0.95, 0.97, 0.99, 1.0, 1.0, 1.0, 1.0]
    plain = RelianceEarlyStopping(patience=2, warmup_epochs=0)
    _fit(values, plain, fit)
    assert plain.stopped_epoch == _expected_stop(values, 2) == 2
    gated = RelianceEarlyStopping(patience=2, min_probe_accuracy=0.9, warmup_epochs=0)
    _fit(values, gated, fit)
    assert gated.stopped_epoch == _expected_stop(values, 2, fit=fit, min_fit=0.9) == 7
    assert gated.state_dict()["min_probe_accuracy"] == 0.9
    with pytest.raises(RuntimeError, match="add a RelianceMonitor"):
        _fit(values, RelianceEarlyStopping(patience=2, min_probe_accuracy=0.9))


def test_plain_early_stopping_would_count_stale_values():
    values = [0.9, None, 0.8, None, 0.85, None, 0.95, None, 0.7, None, 0.6, None]
    plain = pl.callbacks.EarlyStopping(monitor="netprobe/reliance_auc", mode="max", patience=2, strict=False)
    _fit(values, plain)
    ours = RelianceEarlyStopping(patience=2, warmup_epochs=0)
    _fit(values, ours)
    assert plain.stopped_epoch < ours.stopped_epoch  # the stale repetitions ate plain's patience


def test_state_dict_roundtrip():
    stop = RelianceEarlyStopping(patience=5, smoothing=0.5)
    _fit([0.5, 0.6, 0.55], stop)
    other = RelianceEarlyStopping(patience=5, smoothing=0.5)
    other.load_state_dict(stop.state_dict())
    assert other.history == stop.history and float(other._ema) == float(stop._ema)
    assert other.wait_count == stop.wait_count


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(smoothing=1.0), "smoothing"), (dict(warmup_epochs=-1), "warmup_epochs"),
     (dict(patience=0), "patience"), (dict(monitor=""), "monitor"), (dict(min_probe_accuracy=1.5), "min_probe_accuracy")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RelianceEarlyStopping(**kwargs)


def test_reused_for_a_new_fit_it_starts_afresh():
    values = [0.9, 0.8, 0.7, 0.6]
    stop = RelianceEarlyStopping(patience=2, smoothing=0.5, warmup_epochs=0)
    first = _fit(values, stop)
    assert stop.stopped_epoch == 2 and first.current_epoch == 3
    second = _fit([0.1, 0.2, 0.3, 0.4], stop)  # a new Trainer and model: no EMA, best score or patience carried over
    assert [h[2] for h in stop.history] == pytest.approx([0.1, 0.15, 0.225, 0.3125])
    assert stop.stopped_epoch == 0 and second.current_epoch == 4


def test_default_warmup_ignores_the_first_five_epochs():
    # the defaults: records of epochs 0-4 never count (an underfit network scores high), then patience
    values = [0.95, 0.9, 0.85, 0.8, 0.75, 0.6, 0.62, 0.61, 0.6, 0.59, 0.58, 0.57]
    stop = RelianceEarlyStopping(patience=2, smoothing=0.0)
    assert stop.warmup_epochs == 5
    _fit(values, stop)
    assert stop.stopped_epoch == _expected_stop(values, 2, warmup=5)
    assert stop.stopped_epoch > 5


def _stop_lines(caplog):
    return [r.getMessage() for r in caplog.records if "RelianceEarlyStopping: stopped" in r.getMessage()]


def test_one_line_says_when_and_why_it_stopped(caplog):
    caplog.set_level("INFO")
    # patience: the best (raw, no smoothing) is 0.7 at epoch 2; epochs 3 and 4 do not improve on it
    stop = RelianceEarlyStopping(patience=2, smoothing=0.0, warmup_epochs=0)
    _fit([0.5, 0.6, 0.7, 0.6, 0.5, 0.4, 0.3], stop)
    assert stop.stopped_epoch == 4 and stop.best_epoch == 2
    assert _stop_lines(caplog) == [
        "RelianceEarlyStopping: stopped at epoch 4: patience exhausted after 2 fresh measurements without improvement "
        "(patience=2, min_delta=0.0); best netprobe/reliance_auc 0.7000 at epoch 2."]
    caplog.clear()
    # the stopping threshold, on the smoothed value: 0.5, 0.55, 0.625, 0.7125 >= 0.7 at epoch 3
    stop = RelianceEarlyStopping(patience=5, smoothing=0.5, warmup_epochs=0, stopping_threshold=0.7)
    _fit([0.5, 0.6, 0.7, 0.8, 0.9], stop)
    (line,) = _stop_lines(caplog)
    assert line.startswith("RelianceEarlyStopping: stopped at epoch 3: netprobe/reliance_auc (EMA 0.5) 0.7125 reached "
                           "stopping_threshold=0.7; best netprobe/reliance_auc (EMA 0.5) 0.6250 at epoch 2"), line
    caplog.clear()
    # a run that reaches max_epochs prints none
    _fit([0.5, 0.6, 0.7], RelianceEarlyStopping(patience=2, warmup_epochs=0))
    assert _stop_lines(caplog) == []


def test_the_console_shows_the_monitors_means_and_the_stop(caplog, capsys):
    # a real run: the progress bar carries each monitor's main mean, and the stop is one line
    from lightning_helpers import digits, loader, make_module

    from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor

    caplog.set_level("INFO")
    x, y = digits(120)
    mons = [RelianceMonitor(["relu1"], num_samples=48, repeats=1), SelectivityMonitor(["relu1"], num_samples=48),
            ConvergenceMonitor(["relu1"], num_samples=48)]
    stop = RelianceEarlyStopping(patience=1, min_delta=1.0, warmup_epochs=1)  # no record improves by 1.0
    trainer = pl.Trainer(max_epochs=10, callbacks=mons + [stop], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(make_module(pl), loader(x, y))
    assert stop.stopped_epoch == 2  # epoch 1 sets the first best, epoch 2 does not improve by 1.0
    shown = trainer.progress_bar_callback.get_metrics(trainer, trainer.lightning_module)
    keys = ("netprobe/reliance_auc", "netprobe/selectivity_mean", "netprobe/pwcca_prev")
    assert all(isinstance(shown[k], float) for k in keys), shown
    assert shown["netprobe/reliance_auc"] == pytest.approx(float(trainer.callback_metrics["netprobe/reliance_auc"]))
    assert not any(k.startswith("netprobe/") and k not in keys for k in shown)  # the per-layer keys stay off the bar
    bar = capsys.readouterr().out  # the default bar (Rich, or TQDM) writes to stdout; Rich may shorten the names
    assert "netprobe/" in bar and all(f"{shown[k]:.3f}" in bar or f"{shown[k]:.3g}" in bar for k in keys), bar[-2000:]
    (line,) = _stop_lines(caplog)
    assert line.startswith("RelianceEarlyStopping: stopped at epoch 2: patience exhausted after 1 fresh measurement without")
