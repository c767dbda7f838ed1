"""ConvergenceMonitor(methods=("pwcca", "cka")) at the default probe set (256 examples) logs
pwcca_prev on a dense layer of width 64, a conv layer of 64 channels (positions as data points)
and a dense layer of width 512 (reduced to its top n/4 principal directions first). The values
equal the plain numpy reference applied to the same rows, recomputed here from activations
captured by forward hooks (the positions redrawn as netprobe.capture.reductions documents them);
a frozen network gives 1; a resumed run keeps the positions."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from lightning_helpers import trainer  # noqa: E402
from reference_similarity import leading_ref, pwcca_ref  # noqa: E402

from netprobe.lightning import ConvergenceMonitor  # noqa: E402
from netprobe.lightning.convergence import ROWS_PER_UNIT  # noqa: E402

LAYERS = ["relu_c", "relu_d", "relu_w"]  # conv 64 channels x 20 positions, dense 64, dense 512
N, L, BATCH = 256, 20, 64


class Net(pl.LightningModule):
    def __init__(self, lr=1e-2):
        super().__init__()
        self.lr = lr
        self.conv, self.relu_c = nn.Conv1d(1, 64, 5, padding=2), nn.ReLU()
        self.fc_w, self.relu_w = nn.Linear(64 * L, 512), nn.ReLU()
        self.fc_d, self.relu_d = nn.Linear(512, 64), nn.ReLU()
        self.out = nn.Linear(64, 4)

    def forward(self, x):
        h = self.relu_c(self.conv(x[:, None]))
        return self.out(self.relu_d(self.fc_d(self.relu_w(self.fc_w(h.flatten(1))))))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(n=400):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, L, generator=g)
    y = (x[:, :5].sum(1) > 0).long() + 2 * (x[:, 5:10].sum(1) > 0).long()
    return x, y


def loader(x, y):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50, shuffle=False)


class Capture(pl.Callback):
    """The monitored layers' full outputs on the monitor's probe set at each measurement (after it,
    at the same step: nothing trains in between), by plain forward hooks."""

    def __init__(self, mon):
        self.mon, self.acts = mon, []

    def on_train_epoch_end(self, trainer, pl_module):
        x = self.mon._probe[0]
        got, handles = {}, []
        for name in LAYERS:
            def hook(mod, args, out, name=name):
                got.setdefault(name, []).append(out.detach().double())
            handles.append(getattr(pl_module, name).register_forward_hook(hook))
        was = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(x), BATCH):
                    pl_module(x[i : i + BATCH])
        finally:
            for h in handles:
                h.remove()
            pl_module.train(was)
        self.acts.append({k: torch.cat(v) for k, v in got.items()})


def positions(mon, p):
    """The positions the monitor samples, redrawn as reductions.py documents: per forward pass of
    `batch_size` inputs, the k smallest of p uniform keys per input, from its generator state."""
    state = mon.state_dict()["extra"]["pwcca_rows"]
    g = torch.Generator()
    g.set_state(state["generator_state"])
    k = state["positions"]
    return torch.cat([torch.rand((min(BATCH, N - i), p), generator=g).topk(k, dim=1, largest=False).indices
                      for i in range(0, N, BATCH)])


def conv_rows(out, idx):
    """(N, C, L) outputs at positions idx (N, k) -> (N k, C), rows of one input adjacent."""
    seq = out.transpose(1, 2)  # (N, L, C)
    return torch.gather(seq, 1, idx[:, :, None].expand(-1, -1, seq.shape[2])).reshape(-1, seq.shape[2])


def reference_value(name, cur, prev, idx):
    if name == "relu_c":
        cur, prev = conv_rows(cur, idx), conv_rows(prev, idx)
    cur, prev = cur.numpy(), prev.numpy()
    m, d = cur.shape
    if 2 * d >= m:
        cur, prev = leading_ref(cur, m // 4), leading_ref(prev, m // 4)
    return pwcca_ref(cur, prev)


def fit(epochs, lr=1e-2, seed=0, ckpt=None, root=None):
    torch.manual_seed(0)
    x, y = data()
    mon = ConvergenceMonitor(LAYERS, methods=("pwcca", "cka"), batch_size=BATCH, seed=seed)
    cap = Capture(mon)
    kw = {}
    if root is not None:
        kw = dict(enable_checkpointing=True, default_root_dir=str(root),
                  callbacks=[mon, cap, pl.callbacks.ModelCheckpoint(dirpath=str(root), save_last=True)])
    tr = trainer(pl, max_epochs=epochs, callbacks=kw.pop("callbacks", [mon, cap]), **kw)
    tr.fit(Net(lr=lr), loader(x, y), ckpt_path=ckpt)
    return mon, cap


def test_pwcca_prev_on_dense_conv_and_wide_layers_equals_the_reference():
    mon, cap = fit(2)
    k = mon.state_dict()["extra"]["pwcca_rows"]["positions"]
    assert mon.num_samples == N and k == min(L, math.ceil(ROWS_PER_UNIT * 64 / N))
    idx = positions(mon, L)
    v = mon.last_values
    assert "netprobe/pwcca_prev" in v and "netprobe/cka_prev" in v
    for name in LAYERS:
        key = f"netprobe/pwcca_prev/{name}"
        assert key in v, sorted(v)
        want = reference_value(name, cap.acts[1][name], cap.acts[0][name], idx)
        # on 1 - value: a layer that barely changed (the conv one, ~1e-6) still tells positions apart
        assert 1.0 - v[key] == pytest.approx(1.0 - want, rel=1e-6, abs=1e-12), name
        assert 0.0 < v[key] < 1.0
    assert v["netprobe/pwcca_prev"] == pytest.approx(np.mean([v[f"netprobe/pwcca_prev/{n}"] for n in LAYERS]), abs=1e-12)


def test_a_frozen_network_gives_one():
    mon, _ = fit(2, lr=0.0)
    for name in LAYERS:
        assert mon.last_values[f"netprobe/pwcca_prev/{name}"] == pytest.approx(1.0, abs=1e-9), name


def test_resuming_keeps_the_positions(tmp_path):
    whole, _ = fit(3)
    first, _ = fit(2, root=tmp_path)
    resumed, _ = fit(3, ckpt=str(tmp_path / "last.ckpt"))
    a, b = first.state_dict()["extra"]["pwcca_rows"], resumed.state_dict()["extra"]["pwcca_rows"]
    assert a["positions"] == b["positions"] and torch.equal(a["generator_state"], b["generator_state"])
    for name in LAYERS:
        key = f"netprobe/pwcca_prev/{name}"
        assert resumed.last_values[key] == pytest.approx(whole.last_values[key], abs=1e-9), name
    other, _ = fit(3, seed=1)  # another seed (probe set and positions): another value
    assert other.last_values["netprobe/pwcca_prev/relu_c"] != pytest.approx(whole.last_values["netprobe/pwcca_prev/relu_c"], abs=1e-9)


class CountProbeForwards(pl.Callback):
    """Counts the model's forward calls on batches of the probe batch size (training batches are 50)
    once training has started (after the monitors' checks at on_train_start, listed before it)."""

    def __init__(self):
        self.calls = 0

    def on_train_start(self, trainer, pl_module):
        def hook(mod, args):
            if args[0].shape[0] == BATCH:
                self.calls += 1
        self.handle = pl_module.register_forward_pre_hook(hook)

    def on_fit_end(self, trainer, pl_module):
        self.handle.remove()


def fit_with_reliance(epochs, *, shared=True, monkeypatch=None):
    from netprobe.lightning import RelianceMonitor

    torch.manual_seed(0)
    x, y = data()
    conv = ConvergenceMonitor(LAYERS, methods=("pwcca", "cka"), batch_size=BATCH)
    if not shared:
        monkeypatch.setattr(conv, "_extra_capture", lambda *a: None)
    rel = RelianceMonitor(["relu_d"], batch_size=BATCH, figures=False, max_batch=32)  # its stacked passes: < BATCH inputs
    count = CountProbeForwards()
    trainer(pl, max_epochs=epochs, callbacks=[rel, conv, count]).fit(Net(), loader(x, y))
    return conv, rel, count


def test_pwcca_position_rows_come_from_the_shared_probe_pass(monkeypatch):
    shared, rel, count = fit_with_reliance(2)
    separate, rel2, count2 = fit_with_reliance(2, shared=False, monkeypatch=monkeypatch)
    for name in LAYERS:
        key = f"netprobe/pwcca_prev/{name}"
        assert shared.last_values[key] == pytest.approx(separate.last_values[key], rel=0, abs=1e-12), name
    assert rel.last_values["netprobe/reliance_auc"] == rel2.last_values["netprobe/reliance_auc"]
    # the shared probe pass is N / BATCH forwards per measurement; a pass of PWCCA's own doubles it
    assert count.calls == 2 * N // BATCH and count2.calls == 2 * 2 * N // BATCH


def test_position_rows_of_a_peers_pass_on_other_inputs_are_not_used(monkeypatch):
    # a shuffling probe DataLoader: the two monitors draw other probe inputs with equal settings, so
    # the peer's shared pass runs on inputs that are not this monitor's; PWCCA then takes its own rows
    from netprobe.lightning import SelectivityMonitor

    def run(shared):
        torch.manual_seed(0)
        x, y = data()
        probe = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                            generator=torch.Generator().manual_seed(5))
        sel = SelectivityMonitor(["relu_c"], probe_data=probe, num_samples=128, batch_size=BATCH)
        conv = ConvergenceMonitor(["relu_c"], probe_data=probe, num_samples=128, batch_size=BATCH)
        if not shared:
            monkeypatch.setattr(conv, "_extra_capture", lambda *a: None)
        trainer(pl, max_epochs=2, callbacks=[sel, conv]).fit(Net(), loader(x, y))
        assert not torch.equal(conv._probe[0], sel._probe[0])
        return conv.last_values["netprobe/pwcca_prev/relu_c"]

    assert run(True) == run(False)


def test_a_failed_pwcca_comparison_does_not_stop_the_later_ones(monkeypatch):
    """A comparison that fails (here: made to raise at epoch 2, after one that kept its statistics)
    leaves no statistics of other rows behind: the next one compares again, with the reference's value."""
    orig = ConvergenceMonitor._pwcca_of

    def failing_at_epoch_2(self, layer, cur, other, key, acc):
        if self._last_epoch == 2:
            raise ValueError("a comparison that fails")
        return orig(self, layer, cur, other, key, acc)

    monkeypatch.setattr(ConvergenceMonitor, "_pwcca_of", failing_at_epoch_2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip warning of epoch 2
        mon, cap = fit(4)
    idx = positions(mon, L)  # epoch 3 against epoch 2, whose comparison with epoch 1 failed
    assert all(f"netprobe/pwcca_prev/{name}" in mon.last_values for name in LAYERS)
    # the conv layer's and the wide layer's (relu_d has a dead unit by epoch 2, which the numpy
    # reference, written for full-rank inputs, does not drop)
    for name in ("relu_c", "relu_w"):
        want = reference_value(name, cap.acts[3][name], cap.acts[2][name], idx)
        assert 1.0 - mon.last_values[f"netprobe/pwcca_prev/{name}"] == pytest.approx(1.0 - want, rel=1e-6, abs=1e-12), name
