"""One policy for bad probe data in every monitor: refused before the first step, naming the
offending examples and the fix (non-finite inputs, labels that are not classes, one class, inputs
the model cannot take, a resumed run whose probe set changed)."""

import pytest
import torch

from lightning_helpers import digits, loader, make_module, trainer

pl = pytest.importorskip("pytorch_lightning")
from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor  # noqa: E402

MONITORS = {
    "selectivity": lambda **kw: SelectivityMonitor(["relu1"], **kw),
    "reliance": lambda **kw: RelianceMonitor(["relu1"], repeats=1, **kw),
    "convergence": lambda **kw: ConvergenceMonitor(["relu1"], **kw),
}


def _refused(mon, match):
    x, y = digits(200)
    tr = trainer(pl, max_epochs=1, callbacks=[mon])
    with pytest.raises(ValueError, match=match):
        tr.fit(make_module(pl), loader(x, y))
    assert tr.global_step == 0


@pytest.mark.parametrize("kind", list(MONITORS))
def test_non_finite_probe_inputs_are_refused_naming_them(kind):
    x, y = digits(100)
    x[[3, 17, 42]] = float("nan")
    x[50, 0] = float("inf")
    _refused(MONITORS[kind](probe_data=(x, y)), r"probe examples \[3, 17, 42, 50\] \(4 of 100\) have NaN or infinite inputs")


@pytest.mark.parametrize("kind", list(MONITORS))
@pytest.mark.parametrize("label", [-1, -100])
def test_targets_that_are_not_classes_are_refused(kind, label):
    x, y = digits(100)
    y[[5, 9]] = label
    _refused(MONITORS[kind](probe_data=(x, y)), rf"probe examples \[5, 9\] \(2 of 100\) have targets \[{label}\]")


@pytest.mark.parametrize("kind", list(MONITORS))
def test_a_probe_set_of_one_class_is_refused(kind):
    x, y = digits(100)
    _refused(MONITORS[kind](probe_data=(x, torch.full_like(y, 4))), "all 100 probe examples are of class 4")


@pytest.mark.parametrize("kind", list(MONITORS))
def test_probe_inputs_the_model_cannot_take_are_refused(kind):
    x, y = digits(100)
    _refused(MONITORS[kind](probe_data=(x[:, :60], y)), r"cannot run on the probe inputs \(shape \(100, 60\)")


def test_resuming_with_another_probe_set_of_the_same_size_is_refused(tmp_path):
    x, y = digits(300)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = ConvergenceMonitor(["relu1"], probe_data=(x[:64], y[:64]))
    trainer(pl, max_epochs=1, callbacks=[first, ckpt], enable_checkpointing=True).fit(make_module(pl), loader(x, y))
    last = str(tmp_path / "last.ckpt")
    same = ConvergenceMonitor(["relu1"], probe_data=(x[:64], y[:64]))
    tr = trainer(pl, max_epochs=2, callbacks=[same], enable_checkpointing=False)
    tr.fit(make_module(pl), loader(x, y), ckpt_path=last)  # the same probe set: resumes
    assert "netprobe/cka_prev" in tr.callback_metrics
    other = ConvergenceMonitor(["relu1"], probe_data=(x[64:128], y[64:128]))
    with pytest.raises(ValueError, match="another probe set"):
        trainer(pl, max_epochs=2, callbacks=[other], enable_checkpointing=False).fit(make_module(pl), loader(x, y), ckpt_path=last)
