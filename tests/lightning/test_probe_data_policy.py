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


class _NoisyDigits(torch.utils.data.Dataset):
    """Digits with augmentation drawn from numpy's global generator and Python's `random`."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        import random

        import numpy as np

        noise = float(np.random.normal()) + random.random()
        return self.x[i] + 0.01 * noise, self.y[i]


def test_a_resume_redraws_a_probe_set_with_numpy_and_random_augmentation(tmp_path):
    """numpy's and Python's global generators are seeded while the probe set is drawn (and
    restored after): the resumed run draws the same probe set, and the training run's own numpy and
    `random` streams are those it would have without the monitor."""
    import random

    import numpy as np

    x, y = digits(200)
    data = torch.utils.data.DataLoader(_NoisyDigits(x, y), batch_size=50)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    np.random.seed(1), random.seed(1)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    mon = ConvergenceMonitor(["relu1"], num_samples=64)
    tr = trainer(pl, max_epochs=1, callbacks=[mon, ckpt], enable_checkpointing=True)
    with torch.random.fork_rng():
        first = mon._draw_probe_set(type("T", (), {"train_dataloader": data})())
    assert (np.random.get_state()[1] == np_before).all() and random.getstate() == py_before
    again = ConvergenceMonitor(["relu1"], num_samples=64)._draw_probe_set(type("T", (), {"train_dataloader": data})())
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    tr.fit(make_module(pl), data)
    resumed = ConvergenceMonitor(["relu1"], num_samples=64)
    tr2 = trainer(pl, max_epochs=2, callbacks=[resumed], enable_checkpointing=False)
    tr2.fit(make_module(pl), data, ckpt_path=str(tmp_path / "last.ckpt"))  # the same probe set: resumes
    assert "netprobe/cka_prev" in tr2.callback_metrics


@pytest.mark.parametrize("monitor", [ConvergenceMonitor, SelectivityMonitor, RelianceMonitor])
def test_an_empty_probe_set_is_refused_before_the_first_step_naming_the_fix(monitor):
    x, y = digits(100)
    mon = monitor(["relu1"], probe_data=(x[:0], y[:0]))
    with pytest.raises(ValueError, match="no examples.*probe_data"):
        trainer(pl, max_epochs=1, callbacks=[mon]).fit(make_module(pl), loader(x, y))

