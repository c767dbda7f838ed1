"""Reliance as an every-epoch signal: common random numbers (fixed orders), one shared probe pass,
memory-bounded stacking and the unablated point taken from a forward pass already made."""

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from lightning_helpers import digits, loader, make_module, trainer  # noqa: E402
from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor  # noqa: E402
from netprobe.lightning.base import NetprobeMonitor  # noqa: E402
from netprobe.metrics import ablation_curve, noise_curve  # noqa: E402
from netprobe.metrics.ablation import score  # noqa: E402


class _Values(pl.Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()
                            if k.startswith("netprobe/") and not k.startswith("netprobe/time/")})


def _fit(monitors, *, epochs=3, lr=1e-2, ckpt=None, callbacks=(), seed=0, model=None):
    pl.seed_everything(seed, verbose=False)
    x, y = digits(240)
    vals = _Values()
    tr = trainer(pl, max_epochs=epochs, callbacks=[*monitors, vals, *callbacks], enable_checkpointing=bool(callbacks))
    tr.fit(model or make_module(pl, dropout=0.0, lr=lr), loader(x, y, shuffle=False), ckpt_path=ckpt)
    return vals.epochs


def _frozen_trained():
    """A network trained for 10 epochs, then with learning rate 0: it fits the data and no longer changes."""
    model = make_module(pl, dropout=0.0, batchnorm=False, lr=5e-2)  # no running statistics to move either
    _fit([], epochs=10, model=model)
    model.lr = 0.0
    return model


@pytest.mark.parametrize("noise", [False, True])
def test_fixed_orders_give_a_frozen_network_the_same_value_every_epoch_and_per_epoch_orders_do_not(noise):
    keys = ["netprobe/reliance_auc/relu1", "netprobe/reliance_auc/relu2"] + (["netprobe/noise_auc"] if noise else [])
    fixed = _fit([RelianceMonitor(["relu1", "relu2"], num_samples=96, repeats=1, noise=noise)], model=_frozen_trained())
    fresh = _fit([RelianceMonitor(["relu1", "relu2"], num_samples=96, repeats=1, noise=noise, orders="per_epoch")],
                 model=_frozen_trained())
    assert 0.5 < fixed[0]["netprobe/probe_accuracy"] == fixed[2]["netprobe/probe_accuracy"]
    for k in keys:
        assert fixed[0][k] == fixed[1][k] == fixed[2][k], k  # lr=0: the network does not change, nor does the value
    assert any(fresh[0][k] != fresh[1][k] or fresh[1][k] != fresh[2][k] for k in keys[:2])
    # the first measurement is the same draw either way only by chance: the draws are per epoch
    assert len({fresh[e]["netprobe/reliance_auc/relu1"] for e in range(3)}) > 1 or len({fresh[e]["netprobe/reliance_auc/relu2"] for e in range(3)}) > 1


def test_fixed_orders_are_kept_in_the_state_and_a_resumed_run_uses_them(tmp_path):
    def mons(seed):
        return [RelianceMonitor(["relu1", "relu2"], num_samples=96, repeats=2, seed=seed, noise=True)]

    full = _fit(mons(0), epochs=4)
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    first = mons(0)
    _fit(first, epochs=2, callbacks=[ck])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("RelianceMonitor")]
    assert set(state["extra"]["orders"]) == {"relu1", "relu2"}
    assert state["extra"]["orders"]["relu1"].shape == (2, 32)
    resumed = _fit(mons(0), epochs=4, ckpt=str(tmp_path / "last.ckpt"))
    for a, b in zip(full[2:], resumed):
        for k in ("netprobe/reliance_auc/relu1", "netprobe/reliance_auc/relu2", "netprobe/noise_auc"):
            assert a[k] == b[k], k
    # the orders come from the checkpoint, not from a new draw: orders edited in the checkpoint are used
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("RelianceMonitor")]
    edited = {k: v.flip(1) for k, v in ckpt["callbacks"][key]["extra"]["orders"].items()}
    ckpt["callbacks"][key]["extra"]["orders"] = edited
    torch.save(ckpt, tmp_path / "edited.ckpt")
    other = mons(0)
    resumed_edited = _fit(other, epochs=4, ckpt=str(tmp_path / "edited.ckpt"))
    assert torch.equal(other[0].state_dict()["extra"]["orders"]["relu1"], edited["relu1"])
    assert resumed_edited[0]["netprobe/reliance_auc/relu1"] != resumed[0]["netprobe/reliance_auc/relu1"]


def test_orders_differ_by_layer_and_seed_and_per_epoch_has_none_to_keep():
    m0, m1 = RelianceMonitor(["relu1", "relu2"], num_samples=64, repeats=2), RelianceMonitor(["relu1", "relu2"], num_samples=64, repeats=2, seed=1)
    _fit([m0], epochs=1)
    _fit([m1], epochs=1)
    o0, o1 = m0.state_dict()["extra"]["orders"], m1.state_dict()["extra"]["orders"]
    assert not torch.equal(o0["relu1"], o0["relu2"]) and not torch.equal(o0["relu1"], o1["relu1"])
    assert not torch.equal(o0["relu1"][0], o0["relu1"][1])  # the repeats are different orders
    pe = RelianceMonitor(["relu1"], num_samples=64, orders="per_epoch")
    _fit([pe], epochs=1)
    assert pe.state_dict()["extra"]["orders"] == {}
    with pytest.raises(ValueError, match="`orders` to be 'fixed' or 'per_epoch'"):
        RelianceMonitor(["relu1"], orders="random")
    with pytest.raises(ValueError, match="max_elements"):
        RelianceMonitor(["relu1"], max_elements=0)


def _count_captures(monkeypatch):
    """The monitors' forward passes over probe inputs: (monitor class, rows, layers) per pass."""
    calls = []
    real = NetprobeMonitor._capture

    def counting(self, pl_module, x, layers=None, extras=()):
        calls.append((type(self).__name__, x.shape[0], tuple(layers or self.layers)))
        return real(self, pl_module, x, layers, extras)

    monkeypatch.setattr(NetprobeMonitor, "_capture", counting)
    return calls


def _three(**kw):
    return [SelectivityMonitor(["relu1", "relu2"], num_samples=96, mutual_info=True, **kw),
            RelianceMonitor(["relu1", "relu2"], num_samples=96, repeats=2, noise=True, **kw),
            ConvergenceMonitor(["relu1", "relu2"], num_samples=96, **kw)]


def test_values_with_one_monitor_equal_those_with_three_and_the_probe_pass_is_shared(monkeypatch):
    calls = _count_captures(monkeypatch)
    together = _fit(_three())
    full_passes = [c for c in calls if c[1] == 96]
    assert len(full_passes) == 3, full_passes  # one per epoch for the three monitors, all layers at once
    assert all(set(c[2]) == {"relu1", "relu2"} for c in full_passes)
    alone = [{}, {}, {}]
    for i in range(3):
        for e, vals in enumerate(_fit([_three()[i]])):
            alone[e].update(vals)
    reordered = _fit(list(reversed(_three())))
    assert together == alone == reordered  # exactly: one forward pass or three, any callback order


def test_a_monitor_with_another_probe_set_measured_in_between_does_not_break_the_sharing(monkeypatch):
    calls = _count_captures(monkeypatch)
    # callback order: 96, 64, 96 examples; the two monitors of 96 share their pass across the other
    _fit([SelectivityMonitor(["relu1"], num_samples=96), RelianceMonitor(["relu2"], num_samples=64, repeats=1),
          ConvergenceMonitor(["relu1", "relu2"], num_samples=96)], epochs=2)
    per_epoch = [c[1] for c in calls if c[1] in (64, 96)]
    assert sorted(per_epoch) == [64, 64, 96, 96], calls


def test_monitors_with_other_probe_sets_do_not_share_a_pass():
    # (two monitors of one class would write the same keys: refused; so a selectivity monitor beside a
    # convergence monitor with another probe set)
    a = SelectivityMonitor(["relu1"], num_samples=64)
    b = ConvergenceMonitor(["relu1"], num_samples=96)
    _fit([a, b], epochs=1)
    alone = SelectivityMonitor(["relu1"], num_samples=64)
    _fit([alone], epochs=1)
    assert a.last_values["netprobe/selectivity_mean"] == alone.last_values["netprobe/selectivity_mean"]
    other = SelectivityMonitor(["relu1"], num_samples=96)
    _fit([other], epochs=1)
    assert a.last_values["netprobe/selectivity_mean"] != other.last_values["netprobe/selectivity_mean"]


# ----------------------------------------------------------------------------- the metric functions
class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.r1 = nn.Conv1d(1, 8, 3, padding=1), nn.ReLU()
        self.c2, self.r2 = nn.Conv1d(8, 16, 3, padding=1), nn.ReLU()
        self.out = nn.Linear(16 * 20, 4)

    def forward(self, x):
        return self.out(self.r2(self.c2(self.r1(self.c1(x)))).flatten(1))


def _conv_case():
    """A conv net, its data and a stack of 3 orders of the 8 units of its first ReLU."""
    torch.manual_seed(0)
    x, y = _conv_data()
    order = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(s)) for s in range(3)])
    return _Conv().eval(), x, y, order


def _conv_data(n=48):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 20, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("curve", ["ablation", "noise"])
def test_max_elements_bounds_every_module_output_of_a_stacked_pass_and_changes_no_value(curve):
    torch.manual_seed(0)
    net = _Conv().eval()
    x, y = _conv_data()
    row = 16 * 20  # the largest module output per input row (c2, r2)
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append(o.numel())) for m in net.modules()]
    fn = ablation_curve if curve == "ablation" else noise_curve
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]
    ref = fn(net, "r1", data, max_elements=None, repeats=2, generator=torch.Generator().manual_seed(1))
    seen.clear()
    bounded = fn(net, "r1", data, max_elements=12 * row, repeats=2, generator=torch.Generator().manual_seed(1))
    for h in hooks:
        h.remove()
    assert max(seen) <= 12 * row
    assert max(seen) > 8 * row  # the stacks do fill the budget (more rows than one batch of 8)
    assert torch.equal(ref.correct, bounded.correct)
    torch.testing.assert_close(ref.loss_sum, bounded.loss_sum)


class _WidePrefix(nn.Module):
    """A wide layer before the ablated one (c0: 32 channels) and a narrow one after it (4 channels)."""

    def __init__(self):
        super().__init__()
        self.c0, self.r0 = nn.Conv1d(1, 32, 3, padding=1), nn.ReLU()
        self.c1, self.r1 = nn.Conv1d(32, 4, 3, padding=1), nn.ReLU()
        self.out = nn.Linear(4 * 20, 4)

    def forward(self, x):
        return self.out(self.r1(self.c1(self.r0(self.c0(x)))).flatten(1))


@pytest.mark.parametrize("curve", ["ablation", "noise"])
def test_max_elements_bounds_the_layers_before_the_ablated_one_by_their_own_rows(curve):
    # with the masks applied at the layer, the modules before it run on the samples once and those
    # after it on the stacked rows: each is bounded by its own rows, so a wide early layer does not
    # shrink the stacks after a narrow one
    torch.manual_seed(0)
    net = _WidePrefix().eval()
    x, y = _conv_data()
    before, after = 32 * 20, 4 * 20  # the largest output per input row before r1 (c0, r0) and from r1 on
    bound = 8 * before
    rows = {"before": [], "after": []}
    hooks = [getattr(net, n).register_forward_hook(lambda m, a, o, k=k: rows[k].append(o.shape[0]))
             for n, k in (("c0", "before"), ("r0", "before"), ("c1", "before"), ("r1", "after"), ("out", "after"))]
    fn = ablation_curve if curve == "ablation" else noise_curve
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]  # batches of 8: the statistics pass fits too
    ref = fn(net, "r1", data, max_elements=None, repeats=3, generator=torch.Generator().manual_seed(1))
    rows["before"].clear(), rows["after"].clear()
    bounded = fn(net, "r1", data, max_elements=bound, repeats=3, generator=torch.Generator().manual_seed(1))
    for h in hooks:
        h.remove()
    assert max(rows["before"]) * before <= bound and max(rows["after"]) * after <= bound
    assert max(rows["after"]) > bound // before  # more stacked rows than the widest layer's rows would allow
    assert torch.equal(ref.correct, bounded.correct)
    torch.testing.assert_close(ref.loss_sum, bounded.loss_sum)


class _WideStem(nn.Module):
    """A dense stem of 4096 units before the ablated ReLU of 8: one sample's stem output is the bound."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc, self.act, self.head = nn.Linear(4, 4096), nn.Linear(4096, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.act(self.fc(self.stem(x))))


@pytest.mark.parametrize("n, bound", [(64, 4096), (17, 8192)])  # one sample per pass; a one-sample remainder
def test_max_elements_holds_for_one_sample_passes_that_repeat_their_inputs(n, bound, monkeypatch):
    # the bound is on the stacked passes (the statistics pass runs the caller's batches as they come)
    from netprobe.metrics.reliance import _engine

    torch.manual_seed(0)
    net = _WideStem().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    ref = ablation_curve(net, "act", (x, y), max_elements=None, generator=torch.Generator().manual_seed(1))
    seen, stacked = [], [False]
    real = _engine._passes

    def passes(*a, **k):
        stacked[0] = True
        try:
            return real(*a, **k)
        finally:
            stacked[0] = False

    monkeypatch.setattr(_engine, "_passes", passes)
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append(o.numel()) if stacked[0] else None) for m in net.modules()]
    bounded = ablation_curve(net, "act", (x, y), max_elements=bound, generator=torch.Generator().manual_seed(1))
    for h in hooks:
        h.remove()
    assert max(seen) <= bound
    assert torch.equal(ref.correct, bounded.correct)
    torch.testing.assert_close(ref.loss_sum, bounded.loss_sum)


def test_unablated_point_from_the_callers_forward_pass_gives_the_same_curve():
    net, x, y, order = _conv_case()
    ref = ablation_curve(net, "r1", (x, y), order=order)
    with torch.no_grad():
        base = score(net(x), y)
    given = ablation_curve(net, "r1", (x, y), order=order, unablated=base)
    assert torch.equal(ref.correct, given.correct)
    torch.testing.assert_close(ref.loss_sum, given.loss_sum)
    assert float(given.correct[0, 0]) == base[0]


def test_a_stack_of_orders_averages_one_curve_per_order_and_bad_stacks_are_refused():
    net, x, y, order = _conv_case()
    stacked = ablation_curve(net, "r1", (x, y), order=order)
    singles = [ablation_curve(net, "r1", (x, y), order=o) for o in order]
    assert stacked.correct.shape == (3, 11)
    assert torch.equal(stacked.correct, torch.cat([s.correct for s in singles]))
    assert torch.equal(stacked.order, order)
    bad = order.clone()
    bad[1, 0] = bad[1, 1]
    with pytest.raises(ValueError, match="not a permutation"):
        ablation_curve(net, "r1", (x, y), order=bad)
    with pytest.raises(ValueError, match="permutation of the layer's 8 units"):
        ablation_curve(net, "r1", (x, y), order=torch.stack([torch.randperm(9)] * 2))



def test_monitors_with_equal_settings_but_different_probe_inputs_do_not_share_a_pass():
    # the same shuffling DataLoader (with its own generator) gives each monitor other examples
    from netprobe.metrics import class_selectivity
    import netprobe

    x, y = digits(240)
    pdl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=60, shuffle=True,
                                      generator=torch.Generator().manual_seed(5))
    conv = ConvergenceMonitor(["relu1"], probe_data=pdl, num_samples=120)
    sel = SelectivityMonitor(["relu1"], probe_data=pdl, num_samples=120)
    model = make_module(pl, dropout=0.0)
    _fit([conv, sel], epochs=1, model=model)
    assert not torch.equal(conv._probe[0], sel._probe[0])
    sx, sy = sel._probe
    model.eval()
    with torch.no_grad(), netprobe.probe(model, ["relu1"], capacity=1000) as p:
        model(sx)
    own = float(class_selectivity(p["relu1"], sy, num_classes=10).mean)
    assert sel.last_values["netprobe/selectivity_mean/relu1"] == pytest.approx(own, abs=1e-6)
