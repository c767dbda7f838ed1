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


class _Recurrent(pl.LightningModule):
    """An LSTM (sequence-first by default) over 8 steps of 8 features, then a linear head."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = nn.LSTM(8, 16, batch_first=batch_first)
        self.relu = nn.ReLU()
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        seq = x.reshape(x.shape[0], 8, 8)
        if not self.batch_first:
            seq = seq.transpose(0, 1)
        out, _ = self.rnn(seq)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(self.relu(last))

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_tuple_output_layer_needs_select_before_the_first_step_and_works_with_it():
    x, y = digits(96)
    with pytest.raises(ValueError, match=r"RelianceMonitor: layer 'rnn' cannot be ablated: .*select="):
        trainer(pl, max_epochs=1, callbacks=[RelianceMonitor(["rnn"], num_samples=64)]).fit(_Recurrent(), loader(x, y))
    mons = [RelianceMonitor(["rnn"], num_samples=64, select=0), SelectivityMonitor(["relu"], num_samples=64),
            ConvergenceMonitor(["rnn"], num_samples=64, select={"rnn": 0})]
    tr = trainer(pl, max_epochs=1, callbacks=mons)
    tr.fit(_Recurrent(), loader(x, y))
    assert "netprobe/reliance_auc/rnn" in tr.callback_metrics and "netprobe/cka_prev" not in tr.callback_metrics
    # the sequence-first LSTM's captured rows are batch items: the mean over time of its output
    model = _Recurrent()
    conv = ConvergenceMonitor(["rnn"], num_samples=64, select=0)
    trainer(pl, max_epochs=2, callbacks=[conv]).fit(model, loader(x, y))
    px, _ = conv._probe
    with torch.no_grad():
        out, _ = model.rnn(px.reshape(-1, 8, 8).transpose(0, 1))
    torch.testing.assert_close(conv._prev["rnn"], out.mean(0), atol=1e-5, rtol=1e-5)


def test_layout_and_select_are_checked_at_construction_and_setup():
    with pytest.raises(ValueError, match="one 'N'"):
        SelectivityMonitor(["relu1"], layout="NXC")
    with pytest.raises(TypeError, match="`select`"):
        SelectivityMonitor(["relu1"], select=1.5)
    x, y = digits(96)
    with pytest.raises(ValueError, match=r"`layout` names layers that are not monitored: \['relu9'\]"):
        trainer(pl, max_epochs=1, callbacks=[SelectivityMonitor(["relu1"], layout={"relu9": "NC"})]).fit(make_module(pl), loader(x, y))


def test_non_finite_fractions_or_scales_fail_at_construction():
    with pytest.raises(ValueError, match="finite `fractions`"):
        RelianceMonitor(["relu1"], fractions=(0.0, float("nan"), 1.0))
    with pytest.raises(ValueError, match="finite `scales`"):
        RelianceMonitor(["relu1"], noise=True, scales=(0.0, 1.0, float("inf")))


def test_orders_kept_for_other_repeats_are_redrawn_with_a_warning():
    x, y = digits(96)
    first = RelianceMonitor(["relu1"], num_samples=64, repeats=3)
    trainer(pl, max_epochs=1, callbacks=[first]).fit(make_module(pl), loader(x, y))
    state = first.state_dict()
    second = RelianceMonitor(["relu1"], num_samples=64, repeats=5)
    second._widths = {"relu1": 32}
    second.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match=r"kept orders of layer 'relu1' have shape \(3, 32\), but repeats=5"):
        orders = second._random_orders("relu1", 0)
    assert orders.shape == (5, 32)


def test_a_layer_wider_than_the_probe_set_gets_exact_cka_from_gram_matrices():
    from netprobe.metrics import SimilarityAccumulator, linear_cka

    class Snap(pl.Callback):
        def __init__(self, mon):
            self.mon, self.prev, self.values = mon, [], []

        def on_train_epoch_end(self, trainer, pl_module):
            self.prev.append(self.mon._prev["relu1"].clone())
            self.values.append(trainer.callback_metrics.get("netprobe/cka_prev"))

    x, y = digits(240)
    conv = ConvergenceMonitor(["relu1"], num_samples=60)  # 64 units > 2/3 of 60 rows: the Gram form
    snap = Snap(conv)
    trainer(pl, max_epochs=2, callbacks=[conv, snap]).fit(make_module(pl, width=64, batchnorm=False), loader(x, y))
    h0, h1 = snap.prev
    assert h1.shape == (60, 64) and not torch.equal(h0, h1)
    exact = float(linear_cka(h1, h0))
    moments = float(SimilarityAccumulator().update(h1, h0).linear_cka())
    assert float(snap.values[1]) == pytest.approx(exact, abs=1e-6) and exact == pytest.approx(moments, abs=1e-9)
