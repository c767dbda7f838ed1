"""Monitors refuse bad configurations before the first step, with the fix in the message."""

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from lightning_helpers import digits, loader, make_module, trainer  # noqa: E402
from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor  # noqa: E402


def test_probe_data_of_the_wrong_arity_and_bad_keep_fail_at_construction():
    x, y = digits(64)
    with pytest.raises(ValueError, match=r"a tuple of 1 tensors. Pass `probe_data=\(inputs, targets\)`"):
        SelectivityMonitor(["relu1"], probe_data=(x,))
    with pytest.raises(ValueError, match="a list of 3 tensors"):
        SelectivityMonitor(["relu1"], probe_data=[x, y, y])
    with pytest.raises(ValueError, match="`keep`"):
        ConvergenceMonitor(["relu1"], methods=("svcca",), keep=5.0)


def test_features_taken_for_class_scores_are_refused_before_the_first_step():
    class Features(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc1, self.relu1 = nn.Linear(64, 32), nn.ReLU()
            self.head = nn.Linear(32, 128)  # an embedding, not 10 class scores

        def forward(self, x):
            return self.head(self.relu1(self.fc1(x)))

        def training_step(self, batch, _):
            return self(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    x, y = digits(96)
    with pytest.raises(ValueError, match=r"returns 128 scores per input, but the probe targets span only classes 0-9"):
        trainer(pl, max_epochs=1, callbacks=[RelianceMonitor(["relu1"], num_samples=64)]).fit(Features(), loader(x, y))
    # told: a model with 128 classes is accepted
    mon = SelectivityMonitor(["relu1"], num_samples=64, num_classes=128)
    trainer(pl, max_epochs=1, callbacks=[mon]).fit(Features(), loader(x, y))
    assert mon.num_classes == 128


@pytest.mark.parametrize("content", ["garbage", "truncated", "module", "list"])
def test_an_unreadable_reference_checkpoint_fails_before_the_first_step_with_its_path(tmp_path, content):
    x, y = digits(96)
    path = tmp_path / "ref.ckpt"
    if content == "garbage":
        path.write_bytes(b"\x80\x04not a pickle at all")
    elif content == "truncated":
        torch.save({"state_dict": make_module(pl).state_dict()}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "module":  # a whole saved model is accepted
        torch.save(make_module(pl), path)
    else:
        torch.save([1, 2, 3], path)
    mon = ConvergenceMonitor(["relu1"], num_samples=64, reference=str(path))
    tr = trainer(pl, max_epochs=1, callbacks=[mon])
    if content == "module":
        tr.fit(make_module(pl), loader(x, y))
        assert "netprobe/cka_ref" in tr.callback_metrics
        return
    with pytest.raises(ValueError, match="reference checkpoint .*ref.ckpt"):
        tr.fit(make_module(pl), loader(x, y))
