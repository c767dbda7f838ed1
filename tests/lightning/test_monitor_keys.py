"""A logged key has one writer: monitors that would write the same key are refused at setup,
naming both, and ``netprobe/best/<metric>`` is monotone."""

import math

import pytest

from lightning_helpers import digits, loader, make_module, trainer

pl = pytest.importorskip("pytorch_lightning")
from netprobe.lightning import RelianceMonitor, SelectivityMonitor  # noqa: E402


def test_two_monitors_of_one_class_are_refused_at_setup_naming_both():
    x, y = digits(200)
    a, b = RelianceMonitor(["relu1"], num_samples=32, repeats=1), RelianceMonitor(["relu2"], num_samples=32, every_n_epochs=2, repeats=1)
    tr = trainer(pl, max_epochs=2, callbacks=[a, b])
    with pytest.raises(ValueError, match=r"RelianceMonitor\(\['relu1'\]\) and RelianceMonitor\(\['relu2'\], every_n_epochs=2\)"
                                         r".*netprobe/best/reliance_auc.*RelianceMonitor\(\['relu1', 'relu2'\]\)"):
        tr.fit(make_module(pl), loader(x, y))
    assert tr.global_step == 0  # before the first step
    for sel in ([SelectivityMonitor(["relu1"], num_samples=32), SelectivityMonitor(["relu1"], num_samples=32, every_n_epochs=2)],):
        with pytest.raises(ValueError, match="selectivity_mean"):
            trainer(pl, max_epochs=1, callbacks=sel).fit(make_module(pl), loader(x, y))


def test_the_same_metric_from_two_monitor_classes_is_refused():
    class MyReliance(RelianceMonitor):
        pass

    x, y = digits(200)
    mons = [RelianceMonitor(["relu1"], num_samples=32, repeats=1), MyReliance(["relu2"], num_samples=32, repeats=1)]
    with pytest.raises(ValueError, match="MyReliance.*one monitor per metric"):
        trainer(pl, max_epochs=1, callbacks=mons).fit(make_module(pl), loader(x, y))


def test_one_monitor_over_both_layers_logs_a_monotone_best():
    x, y = digits(200)
    mon = RelianceMonitor(["relu1", "relu2"], num_samples=32, repeats=1)
    seen = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            cm = trainer.callback_metrics
            seen.append((float(cm["netprobe/reliance_auc"]), float(cm["netprobe/best/reliance_auc"]),
                         float(cm["netprobe/reliance_auc/relu1"]), float(cm["netprobe/reliance_auc/relu2"])))

    trainer(pl, max_epochs=4, callbacks=[mon, Record()]).fit(make_module(pl, lr=0.05), loader(x, y))
    assert len(seen) == 4
    best = -math.inf
    for mean, b, r1, r2 in seen:
        assert mean == pytest.approx((r1 + r2) / 2)
        best = max(best, mean)
        assert b == pytest.approx(best)
