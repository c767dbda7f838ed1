"""Monitor options and warnings, on real (tiny, CPU) Trainers: a single method name for
ConvergenceMonitor, and ``cka_debiased``; RBF CKA's probe-set bound checked before the first step,
with its options (``rbf_threshold``, ``rbf_max_samples``); a skipped layer's warning saying which
layers the mean covers, once per layer and metric; and a probe set smaller than ``num_samples``."""

import warnings

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from lightning_helpers import digits, loader, make_module, trainer  # noqa: E402
from netprobe.capture import probe  # noqa: E402
from netprobe.lightning import ConvergenceMonitor, SelectivityMonitor  # noqa: E402
from netprobe.metrics import linear_cka, rbf_cka  # noqa: E402


class Steps(pl.Callback):
    """Counts the training steps (a refusal must come before the first)."""

    def __init__(self):
        self.n = 0

    def on_train_batch_start(self, *args):
        self.n += 1


def _acts(model, layer, x):
    model.eval()
    with probe(model, [layer]) as p, torch.no_grad():
        model(x)
    return p[layer]


def _netprobe_warnings(rec, text):
    return [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning) and text in str(w.message)]


# ----------------------------------------------------------------------------- 1. methods
def test_methods_takes_one_name_as_a_string():
    assert ConvergenceMonitor(["relu1"], methods="cka").metrics == ("cka_prev",)
    assert ConvergenceMonitor(["relu1"], methods="rbf_cka", reference=torch.nn.Linear(1, 1)).metrics == ("rbf_cka_prev", "rbf_cka_ref")
    assert ConvergenceMonitor(["relu1"], methods=["cka", "svcca", "cka"]).metrics == ("cka_prev", "svcca_prev")  # repeats once
    with pytest.raises(ValueError, match=r"one name or a sequence of names among \[.*'cka_debiased'\], but got \['cosine'\]"):
        ConvergenceMonitor(["relu1"], methods="cosine")
    with pytest.raises(TypeError, match="Expected `methods` to be a method name or a sequence of names"):
        ConvergenceMonitor(["relu1"], methods=3)
    # a single layer name is not split into letters either (the other argument taking names)
    x, y = digits(100)
    mon = ConvergenceMonitor("relu1", methods="cka", num_samples=64)
    trainer(pl, max_epochs=2, callbacks=[mon]).fit(make_module(pl, batchnorm=False), loader(x, y))
    assert mon.layers == ["relu1"] and "netprobe/cka_prev/relu1" in mon.last_values


def test_cka_debiased_is_logged_as_its_function_gives_it():
    torch.manual_seed(0)
    x, y = digits(200)
    px, py = x[:80], y[:80]  # width 96 > 80 rows: where debiased CKA departs most from the biased one
    model = make_module(pl, dropout=0.0, batchnorm=False, width=96)
    torch.manual_seed(1)
    ref = make_module(pl, dropout=0.0, batchnorm=False, width=96)  # another initialization: far from 1
    mon = ConvergenceMonitor(["relu1", "relu2"], methods=("cka", "cka_debiased"), reference=ref, probe_data=(px, py))
    assert mon.metrics == ("cka_prev", "cka_debiased_prev", "cka_ref", "cka_debiased_ref")
    trainer(pl, max_epochs=2, callbacks=[mon]).fit(model, loader(x, y))
    for layer in ("relu1", "relu2"):
        cur, r = _acts(model, layer, px), _acts(ref, layer, px)
        want = float(linear_cka(cur, r, debiased=True))
        assert mon.last_values[f"netprobe/cka_debiased_ref/{layer}"] == pytest.approx(want, abs=1e-6)
        assert abs(want - float(linear_cka(cur, r))) > 1e-3  # a value of its own, not the biased one
        assert f"netprobe/cka_debiased_prev/{layer}" in mon.last_values
    assert "netprobe/cka_debiased_prev" in mon.last_values and "netprobe/cka_debiased_ref" in mon.last_values
    steps = Steps()
    with pytest.raises(ValueError, match=r"at least 4 probe examples for cka_debiased.*n=3"):
        trainer(pl, max_epochs=1, callbacks=[ConvergenceMonitor(["relu1"], methods="cka_debiased", probe_data=(px[:3], py[:3])), steps]
                ).fit(make_module(pl, batchnorm=False), loader(x, y))
    assert steps.n == 0


# ----------------------------------------------------------------------------- 2. rbf_cka
def test_rbf_cka_probe_set_over_its_bound_is_refused_before_the_first_step():
    g = torch.Generator().manual_seed(0)
    n = 10_001  # rbf_cka's default max_samples is 10000
    x, y = torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    steps = Steps()
    mon = ConvergenceMonitor(["relu1"], methods=("cka", "rbf_cka"), num_samples=n)
    with pytest.raises(ValueError, match=r"at most `rbf_max_samples`=10000 probe examples for rbf_cka.*n=10001\. "
                                         r"Lower `num_samples` to 10000 or fewer, or pass `rbf_max_samples=10001`"):
        trainer(pl, max_epochs=1, callbacks=[mon, steps]).fit(make_module(pl, batchnorm=False), loader(x, y, batch_size=5000))
    assert steps.n == 0
    # user tensors: the fix is fewer rows (num_samples does not cut them)
    px, py = digits(100)
    mon = ConvergenceMonitor(["relu1"], methods="rbf_cka", probe_data=(px, py), rbf_max_samples=50)
    with pytest.raises(ValueError, match=r"`rbf_max_samples`=50 .*n=100\. Pass fewer `probe_data` rows, or pass `rbf_max_samples=100`"):
        trainer(pl, max_epochs=1, callbacks=[mon, steps]).fit(make_module(pl, batchnorm=False), loader(px, py))
    assert steps.n == 0


def test_rbf_options_reach_rbf_cka_and_are_checked_at_construction():
    for bad in (0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="Expected `rbf_threshold` to be a positive finite number"):
            ConvergenceMonitor(["relu1"], methods="rbf_cka", rbf_threshold=bad)
    for bad in (3, 4.0, True, None):
        with pytest.raises(ValueError, match="Expected `rbf_max_samples` to be an int >= 4"):
            ConvergenceMonitor(["relu1"], methods="rbf_cka", rbf_max_samples=bad)
    torch.manual_seed(0)
    x, y = digits(200)
    px, py = x[:64], y[:64]
    model = make_module(pl, dropout=0.0, batchnorm=False)
    torch.manual_seed(1)
    ref = make_module(pl, dropout=0.0, batchnorm=False)  # another initialization: far from 1
    mon = ConvergenceMonitor(["relu1"], methods="rbf_cka", reference=ref, probe_data=(px, py), rbf_threshold=0.3, rbf_max_samples=64)
    trainer(pl, max_epochs=1, callbacks=[mon]).fit(model, loader(x, y))
    cur, r = _acts(model, "relu1", px), _acts(ref, "relu1", px)
    want = float(rbf_cka(cur, r, threshold=0.3))
    assert mon.last_values["netprobe/rbf_cka_ref/relu1"] == pytest.approx(want, abs=1e-6)
    assert abs(want - float(rbf_cka(cur, r))) > 1e-3  # the bandwidth matters here: the option was used


# ----------------------------------------------------------------------------- 3. a skipped layer and the mean
def test_a_dead_layer_warns_once_what_the_mean_covers():
    x, y = digits(100)
    model = make_module(pl, batchnorm=False, lr=0.0)
    with torch.no_grad():
        model.fc1.bias.fill_(-1e3)  # relu1 is zero for every input, at every epoch
    mon = SelectivityMonitor(["relu1", "relu2"], num_samples=64)
    tr = trainer(pl, max_epochs=3, callbacks=[mon])
    with pytest.warns(RuntimeWarning) as rec:
        tr.fit(model, loader(x, y))
    said = _netprobe_warnings(rec, "for layer 'relu1' skipped")
    assert len(said) == 1, said  # once in the fit, not at each of the 3 epochs
    assert "every unit was zero" in said[0]
    assert "the mean `netprobe/selectivity_mean` covers 1 of 2 layers this epoch (without 'relu1')" in said[0]
    cm = tr.callback_metrics  # the mean is still logged, over the layer that has a value (nothing made up)
    assert float(cm["netprobe/selectivity_mean"]) == float(cm["netprobe/selectivity_mean/relu2"])
    assert "netprobe/selectivity_mean/relu1" not in cm


def test_a_layer_that_stops_changing_skips_cka_prev_and_says_so_once():
    x, y = digits(100)

    class Flatten(pl.Callback):  # from epoch 2 on, relu2 is constant (0) on every input
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                with torch.no_grad():
                    pl_module.fc2.weight.zero_()
                    pl_module.fc2.bias.fill_(-1.0)

    values = []

    class Read(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            values.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("netprobe/cka_prev")})

    model = make_module(pl, batchnorm=False, lr=0.0)
    mon = ConvergenceMonitor(["relu1", "relu2"], num_samples=64, methods=("cka",))
    with pytest.warns(RuntimeWarning) as rec:
        trainer(pl, max_epochs=4, callbacks=[Flatten(), mon, Read()]).fit(model, loader(x, y))
    said = _netprobe_warnings(rec, "ConvergenceMonitor")
    assert len(said) == 1, said  # epochs 2 and 3 skip relu2; epoch 0 has no previous measurement: no warning
    assert "cka (to the previous measurement) for layer 'relu2' skipped this epoch" in said[0]
    assert "the mean `netprobe/cka_prev` covers 1 of 2 layers this epoch (without 'relu2')" in said[0]
    assert values[0] == {} and set(values[1]) == {"netprobe/cka_prev", "netprobe/cka_prev/relu1", "netprobe/cka_prev/relu2"}
    for v in values[2:]:
        assert v["netprobe/cka_prev"] == v["netprobe/cka_prev/relu1"] and "netprobe/cka_prev/relu2" not in v


# ----------------------------------------------------------------------------- 4. num_samples over the dataset
def test_num_samples_over_the_dataset_warns_once_with_both_sizes():
    x, y = digits(100)
    mons = [SelectivityMonitor(["relu1"], num_samples=256), ConvergenceMonitor(["relu1"], num_samples=256)]
    with pytest.warns(RuntimeWarning) as rec:
        trainer(pl, max_epochs=2, callbacks=mons).fit(make_module(pl, batchnorm=False), loader(x, y))
    said = _netprobe_warnings(rec, "`num_samples`=256")
    assert len(said) == 1, said  # once, though two monitors draw the same probe set, over two epochs
    assert "the training dataset has only 100 examples" in said[0] and "Pass `num_samples=100`" in said[0]
    assert all(len(m._probe[0]) == 100 for m in mons)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer(pl, max_epochs=1, callbacks=[SelectivityMonitor(["relu1"], num_samples=100)]).fit(
            make_module(pl, batchnorm=False), loader(x, y))
    assert not _netprobe_warnings(rec, "`num_samples`=")
    # a probe DataLoader with fewer examples than asked for: said the same way
    probe_loader = loader(x[:40], y[:40], shuffle=False)
    with pytest.warns(RuntimeWarning, match=r"`num_samples`=64, but the `probe_data` DataLoader has only 40 examples"):
        trainer(pl, max_epochs=1, callbacks=[SelectivityMonitor(["relu1"], num_samples=64, probe_data=probe_loader)]).fit(
            make_module(pl, batchnorm=False), loader(x, y))


def test_a_strict_early_stopping_with_every_n_epochs_above_1_is_refused_before_the_first_step():
    x, y = digits(240)
    mon = SelectivityMonitor(["relu1"], num_samples=96, every_n_epochs=2)
    stop = pl.callbacks.EarlyStopping(monitor="netprobe/selectivity_mean", mode="max", strict=True)
    tr = trainer(pl, max_epochs=2, callbacks=[mon, stop])
    with pytest.raises(ValueError, match=r"every_n_epochs=2: first measured at the end of epoch 1.*strict=False"):
        tr.fit(make_module(pl), loader(x, y))
    lenient = pl.callbacks.EarlyStopping(monitor="netprobe/selectivity_mean", mode="max", strict=False)
    tr = trainer(pl, max_epochs=2, callbacks=[SelectivityMonitor(["relu1"], num_samples=96, every_n_epochs=2), lenient])
    tr.fit(make_module(pl), loader(x, y))
    assert "netprobe/selectivity_mean" in tr.callback_metrics
