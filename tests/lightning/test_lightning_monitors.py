"""The Lightning monitors with real Trainers (both `pytorch_lightning` and `lightning.pytorch`)."""

import csv
import importlib
import math
import pickle

import pytest
import torch
from torch import nn

from lightning_helpers import _NETS, digits, loader, make_module, trainer
from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor
from netprobe.metrics import ablation_curve, class_selectivity, linear_cka, pwcca

PACKAGES = [p for p in ("pytorch_lightning", "lightning.pytorch") if importlib.util.find_spec(p.split(".")[0])]


def _pl(name):
    return importlib.import_module(name)


class Recorder:
    """Reads the monitors' values at each epoch end (after them) and the per-step loss."""

    def __init__(self, pl):
        self.epochs, self.losses = [], []
        self.cb = self._make(pl)

    def _make(self, pl):
        rec = self

        class _R(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                rec.losses.append(outputs["loss"].detach().clone())

            def on_train_epoch_end(self, trainer, pl_module):
                rec.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("netprobe/")})

        return _R()


@pytest.mark.parametrize("package", PACKAGES)
def test_values_equal_the_functional_metrics_on_the_probe_set(package):
    pl = _pl(package)
    torch.manual_seed(0)
    x, y = digits(300)
    model = make_module(pl, dropout=0.0)
    sel = SelectivityMonitor(["relu1", "relu2"], num_samples=128)
    rel = RelianceMonitor(["relu2"], num_samples=128, repeats=2)
    conv = ConvergenceMonitor(["relu1"], num_samples=128, methods=("pwcca", "cka"))
    tr = trainer(pl, max_epochs=2, callbacks=[sel, rel, conv])
    tr.fit(model, loader(x, y))
    # the probe set: 128 training examples drawn by the callback's own generator, same for all three
    idx = sel._probe_indices
    assert idx is not None and len(idx) == 128 and torch.equal(idx, rel._probe_indices)
    px, py = x[idx], y[idx]
    model.eval()
    with torch.no_grad():
        h1 = model.relu1(model.bn1(model.fc1(px)))
        h2 = model.relu2(model.fc2(model.drop(h1)))
    cm = tr.callback_metrics
    for name, h in (("relu1", h1), ("relu2", h2)):
        assert float(cm[f"netprobe/selectivity_mean/{name}"]) == pytest.approx(float(class_selectivity(h, py, num_classes=10).mean), abs=1e-6)
    orders = rel.state_dict()["extra"]["orders"]["relu2"]  # drawn once, kept for the run
    assert orders.shape == (2, h2.shape[1])
    exp = ablation_curve(model, "relu2", (px, py), order=orders, fractions=rel.fractions)
    assert float(cm["netprobe/reliance_auc/relu2"]) == pytest.approx(float(exp.auc), abs=1e-6)
    assert float(cm["netprobe/reliance_auc"]) == pytest.approx(float(exp.auc), abs=1e-6)
    # the unnormalized area: the trapezoid under the accuracy curve over the fractions' span
    area = float(torch.trapezoid(exp.accuracy, exp.fractions) / (exp.fractions[-1] - exp.fractions[0]))
    assert float(cm["netprobe/reliance_area/relu2"]) == pytest.approx(area, abs=1e-6)
    with torch.no_grad():
        own_acc = (model(px).argmax(1) == py).double().mean()
    assert float(cm["netprobe/probe_accuracy"]) == pytest.approx(float(own_acc), abs=1e-6)
    assert 0 < float(cm["netprobe/pwcca_prev"]) <= 1 and 0 < float(cm["netprobe/cka_prev"]) <= 1
    assert "netprobe/time/RelianceMonitor" in cm
    # *_prev compares with the previous epoch's activations kept by the monitor
    prev = conv._prev["relu1"]
    assert prev.shape == (128, 32)
    torch.testing.assert_close(prev, h1.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("monitor_first", [True, False])
@pytest.mark.parametrize("with_val", [False, True])
def test_early_stopping_and_checkpoint_see_values_in_the_same_epoch(package, monitor_first, with_val, tmp_path):
    pl = _pl(package)
    torch.manual_seed(1)
    x, y = digits(300)
    rel = RelianceMonitor(["relu1", "relu2"], num_samples=96, repeats=1, fractions=[0.0, 0.5, 1.0])
    rec = Recorder(pl)
    patience = 2
    es = pl.callbacks.EarlyStopping(monitor="netprobe/reliance_auc", mode="max", patience=patience)
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="netprobe/reliance_auc", mode="max", save_top_k=1,
                                      filename="{epoch}")
    cbs = [rel, es, ck] if monitor_first else [es, ck, rel]
    tr = trainer(pl, max_epochs=14, callbacks=[*cbs, rec.cb], enable_checkpointing=True,
                 limit_val_batches=1.0 if with_val else 0)
    model = make_module(pl, lr=0.05)
    # one epoch of training first: an untrained net near chance has the highest normalized AUC, and
    # the run would always keep epoch 0; from here the signal goes up and down
    trainer(pl, max_epochs=1).fit(model, loader(x, y))
    tr.fit(model, loader(x, y), loader(x[:100], y[:100], shuffle=False) if with_val else None)
    values = [e["netprobe/reliance_auc"] for e in rec.epochs]
    # independent re-statement of EarlyStopping(mode="max", min_delta=0, patience=2) on the logged values
    best, wait, stop = -math.inf, 0, None
    for epoch, v in enumerate(values):
        if v > best:
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                stop = epoch
                break
    if stop is None:
        assert es.stopped_epoch == 0 and len(values) == 14
    else:
        assert es.stopped_epoch == stop and len(values) == stop + 1
    best_epoch = max(range(len(values)), key=lambda e: (values[e], -e))
    assert stop is not None and best_epoch > 0  # a scenario where stopping and the best epoch are not trivial
    assert ck.best_model_path.endswith(f"epoch={best_epoch}.ckpt")
    assert float(ck.best_model_score) == pytest.approx(values[best_epoch], abs=1e-6)


@pytest.mark.parametrize("package", PACKAGES)
def test_training_is_bit_identical_with_and_without_monitors(package):
    pl = _pl(package)
    x, y = digits(300)
    runs = []
    for with_monitors in (False, True):
        pl.seed_everything(3, verbose=False)
        model = make_module(pl, dropout=0.3, batchnorm=True)
        rec = Recorder(pl)
        cbs = [rec.cb]
        if with_monitors:
            cbs = [SelectivityMonitor(["relu1", "relu2"], num_samples=64, mutual_info=True),
                   RelianceMonitor(["relu1"], num_samples=64, noise=True, repeats=1),
                   ConvergenceMonitor(["relu2"], num_samples=96), *cbs]
        tr = trainer(pl, max_epochs=3, callbacks=cbs)
        tr.fit(model, loader(x, y, shuffle=True))
        runs.append((torch.stack(rec.losses), {k: v.clone() for k, v in model.state_dict().items()}))
        assert model.training and all(m.training for m in model.modules())
        assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(runs[0][0], runs[1][0])
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k


@pytest.mark.parametrize("package", PACKAGES)
def test_csv_logger_and_no_logger(package, tmp_path):
    pl = _pl(package)
    x, y = digits(200)
    from pytorch_lightning.loggers import CSVLogger as PLCSV  # noqa: F401

    csv_cls = _pl(package).loggers.CSVLogger
    tr = trainer(pl, max_epochs=2, logger=csv_cls(tmp_path), callbacks=[SelectivityMonitor(["relu1"], num_samples=64)])
    tr.fit(make_module(pl), loader(x, y))
    rows = list(csv.DictReader(open(tr.logger.log_dir + "/metrics.csv")))
    vals = [r["netprobe/selectivity_mean"] for r in rows if r.get("netprobe/selectivity_mean")]
    assert len(vals) == 2
    tr2 = trainer(pl, max_epochs=1, callbacks=[SelectivityMonitor(["relu1"], num_samples=64)])
    tr2.fit(make_module(pl), loader(x, y))
    assert "netprobe/selectivity_mean/relu1" in tr2.callback_metrics


@pytest.mark.parametrize("package", PACKAGES[:1])
def test_every_n_epochs_and_resume(package, tmp_path):
    pl = _pl(package)
    x, y = digits(200)

    def run(max_epochs, ckpt=None, callbacks=()):
        pl.seed_everything(0, verbose=False)
        rec = Recorder(pl)
        mons = [RelianceMonitor(["relu1"], num_samples=64, repeats=1), ConvergenceMonitor(["relu1", "relu2"], num_samples=96, methods=("pwcca", "svcca", "cka")),
                SelectivityMonitor(["relu2"], num_samples=64, every_n_epochs=2)]
        tr = trainer(pl, max_epochs=max_epochs, callbacks=[*mons, rec.cb, *callbacks], enable_checkpointing=bool(callbacks))
        tr.fit(make_module(pl, dropout=0.0), loader(x, y, shuffle=False), ckpt_path=ckpt)
        return rec.epochs

    full = run(4)
    assert "netprobe/selectivity_mean" not in full[0] or full[0]["netprobe/selectivity_mean"] == full[1].get("netprobe/selectivity_mean")
    ck = _pl(package).callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    run(2, callbacks=[ck])
    resumed = run(4, ckpt=str(tmp_path / "last.ckpt"))
    assert len(resumed) == 2
    for a, b in zip(full[2:], resumed):
        for k in ("netprobe/reliance_auc", "netprobe/pwcca_prev", "netprobe/cka_prev", "netprobe/svcca_prev"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k


@pytest.mark.parametrize("package", PACKAGES[:1])
def test_misconfiguration_fails_fast_with_clear_messages(package):
    pl = _pl(package)
    x, y = digits(100)
    with pytest.raises(ValueError, match=r"Unknown layer 'relu3'.*relu"):
        trainer(pl, max_epochs=1, callbacks=[SelectivityMonitor(["relu3"])]).fit(make_module(pl), loader(x, y))
    with pytest.raises(ValueError, match=r"PWCCA compares a layer with itself.*num_samples > 64"):
        trainer(pl, max_epochs=1, callbacks=[ConvergenceMonitor(["relu1"], num_samples=20, methods=("pwcca", "cka"))]).fit(make_module(pl), loader(x, y))
    with pytest.raises(ValueError, match="no classes can be inferred"):
        trainer(pl, max_epochs=1, callbacks=[SelectivityMonitor(["relu1"], probe_data=(x, y.float()))]).fit(make_module(pl), loader(x, y))
    with pytest.raises(ValueError, match="every_n_epochs"):
        RelianceMonitor(["relu1"], every_n_epochs=0)
    with pytest.raises(ValueError, match="methods"):
        ConvergenceMonitor(["relu1"], methods=("cca_distance",))
    with pytest.raises(ValueError, match="fractions"):
        RelianceMonitor(["relu1"], fractions=[0.2, 0.5])
    with pytest.raises(TypeError, match="probe_data"):
        SelectivityMonitor(["relu1"], probe_data=3)


def test_reference_model_and_user_probe_data():
    import pytorch_lightning as pl

    x, y = digits(200)
    torch.manual_seed(0)
    model = make_module(pl, dropout=0.0)
    ref = make_module(pl, dropout=0.0)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    mon = ConvergenceMonitor(["relu1"], reference=ref, probe_data=(x[:100], y[:100]), methods=("pwcca", "cka"))
    tr = trainer(pl, max_epochs=1, callbacks=[mon])
    tr.fit(model, loader(x, y))
    model.eval()
    with torch.no_grad():
        h = model.relu1(model.bn1(model.fc1(x[:100])))
        h_ref = ref.relu1(ref.bn1(ref.fc1(x[:100])))
    cm = tr.callback_metrics
    assert float(cm["netprobe/pwcca_ref"]) == pytest.approx(float(pwcca(h, h_ref)), abs=1e-5)
    assert float(cm["netprobe/cka_ref"]) == pytest.approx(float(linear_cka(h, h_ref)), abs=1e-5)


def test_layer_called_twice_fails_fast_and_settings_tell_monitors_apart():
    import pytorch_lightning as pl

    x, y = digits(100)
    m = make_module(pl, dropout=0.0, batchnorm=False)
    once = m.forward

    def twice(inp):
        m.relu1(m.fc1(inp))  # a second call of relu1 per forward
        return once(inp)

    m.forward = twice
    with pytest.raises(ValueError, match=r"one row per probe input.*'relu1': 32"):
        trainer(pl, max_epochs=1, callbacks=[SelectivityMonitor(["relu1"])]).fit(m, loader(x, y))
    # two monitors of one class on the same layers, with different settings, have different state keys
    a, b = SelectivityMonitor(["relu1"], num_samples=64), SelectivityMonitor(["relu1"], num_samples=64, every_n_epochs=2)
    assert a.state_key != b.state_key
    key = a.state_key  # built once, rebuilt when a setting changes
    a.layer_specs.append("relu2")
    assert a.state_key != key and "relu2" in a.state_key
    a.layer_specs.pop()
    assert a.state_key == key


def test_selectivity_order_on_a_signed_layer_skips_that_layer_with_a_warning():
    import pytorch_lightning as pl

    x, y = digits(100)
    mon = RelianceMonitor(["fc1", "relu1"], order="selectivity_desc", num_samples=64, repeats=1)
    tr = trainer(pl, max_epochs=1, callbacks=[mon])
    with pytest.warns(RuntimeWarning, match=r"selectivity order\) for layer 'fc1' skipped.*non-negative"):
        tr.fit(make_module(pl, batchnorm=False), loader(x, y))
    cm = tr.callback_metrics
    assert "netprobe/reliance_auc/relu1" in cm and "netprobe/reliance_auc/fc1" not in cm


def test_media_every_thins_histograms_but_not_scalars(tmp_path):
    import pytorch_lightning as pl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = digits(100)
    mon = SelectivityMonitor(["relu1"], num_samples=64, media_every=2)
    tr = trainer(pl, max_epochs=5, callbacks=[mon], logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="m"))
    tr.fit(make_module(pl), loader(x, y))
    acc = EventAccumulator(tr.logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    hist_steps = [e.step for e in acc.Histograms("netprobe/selectivity/relu1")]
    scalar_steps = [e.step for e in acc.Scalars("netprobe/selectivity_mean")]
    assert len(scalar_steps) == 5 and hist_steps == [scalar_steps[0], scalar_steps[2], scalar_steps[4]]


class _Acts:
    """Records relu1's activations on the probe inputs after every epoch, computed here by hand."""

    def __init__(self, pl, px):
        self.px, self.acts = px, []
        outer = self

        class CB(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                was = pl_module.training
                pl_module.eval()
                with torch.no_grad():
                    outer.acts.append(pl_module.relu1(pl_module.bn1(pl_module.fc1(outer.px))).double())
                pl_module.train(was)

        self.cb = CB()


def test_convergence_values_equal_the_functional_metrics_between_consecutive_epochs():
    import pytorch_lightning as pl

    from netprobe.metrics import pwcca, svcca

    x, y = digits(300)
    torch.manual_seed(0)
    conv = ConvergenceMonitor(["relu1"], probe_data=(x[:150], y[:150]), methods=("pwcca", "svcca", "cka"))
    acts, rec = _Acts(pl, x[:150]), Recorder(pl)
    trainer(pl, max_epochs=3, callbacks=[conv, acts.cb, rec.cb]).fit(make_module(pl, dropout=0.0), loader(x, y))
    for e in (1, 2):
        cur, prev = acts.acts[e], acts.acts[e - 1]
        v = rec.epochs[e]
        assert v["netprobe/pwcca_prev/relu1"] == pytest.approx(float(pwcca(cur, prev)), abs=1e-5)
        assert v["netprobe/svcca_prev/relu1"] == pytest.approx(float(svcca(cur, prev)), abs=1e-5)
        assert v["netprobe/cka_prev/relu1"] == pytest.approx(float(linear_cka(cur, prev)), abs=1e-5)
    assert "netprobe/pwcca_prev" not in rec.epochs[0]  # nothing to compare with at the first epoch


def test_dict_batches_and_a_custom_batch_hook():
    import pytorch_lightning as pl

    x, y = digits(120)

    class DictData(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"x": x[i], "y": y[i]}

    class DictNet(_NETS[pl.__name__]):
        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    dl = torch.utils.data.DataLoader(DictData(), batch_size=30)
    sel = SelectivityMonitor(["relu1"], num_samples=64)  # the default hook reads obvious dict keys
    tr = trainer(pl, max_epochs=1, callbacks=[sel])
    tr.fit(DictNet(), dl)
    assert "netprobe/selectivity_mean" in tr.callback_metrics

    class Odd(SelectivityMonitor):  # an unusual batch format, handled by overriding the hook
        def batch_to_inputs_targets(self, batch):
            return batch["pixels"], batch["label"]

    class OddData(DictData):
        def __getitem__(self, i):
            return {"pixels": x[i], "label": y[i]}

    class OddNet(_NETS[pl.__name__]):
        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self(batch["pixels"]), batch["label"])

    tr = trainer(pl, max_epochs=1, callbacks=[Odd(["relu1"], num_samples=64)])
    tr.fit(OddNet(), torch.utils.data.DataLoader(OddData(), batch_size=30))
    assert "netprobe/selectivity_mean" in tr.callback_metrics


def test_without_matplotlib_one_warning_and_scalars_only(monkeypatch, tmp_path):
    import sys

    import pytorch_lightning as pl

    from netprobe import viz

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(viz, "_warned", False)
    x, y = digits(100)
    mon = RelianceMonitor(["relu1"], num_samples=64, repeats=1, media_every=1)
    tr = trainer(pl, max_epochs=2, callbacks=[mon], logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="r"))
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed") as rec:
        tr.fit(make_module(pl), loader(x, y))
    assert sum("matplotlib is not installed" in str(w.message) for w in rec) == 1
    assert "netprobe/reliance_auc" in tr.callback_metrics


def test_a_failing_method_skips_only_itself():
    import pytorch_lightning as pl

    x, y = digits(100)
    # 40 probe examples, 32 units: SVCCA keeping ~all directions needs n > 2 x 32 and fails; CKA does not
    conv = ConvergenceMonitor(["relu1"], probe_data=(x[:40], y[:40]), methods=("svcca", "cka"), keep=0.999999)
    tr = trainer(pl, max_epochs=2, callbacks=[conv])
    with pytest.warns(RuntimeWarning, match=r"svcca \(to the previous measurement\) for layer 'relu1' skipped.*SVCCA needs"):
        tr.fit(make_module(pl, batchnorm=False, dropout=0.0), loader(x, y))
    assert "netprobe/cka_prev/relu1" in tr.callback_metrics and "netprobe/svcca_prev/relu1" not in tr.callback_metrics


def test_startup_checks_catch_what_would_fail_every_epoch():
    import pytorch_lightning as pl

    x, y = digits(100)

    class Steps(pl.Callback):
        n = 0

        def on_train_batch_start(self, *a):
            Steps.n += 1

    def fit(mon, model=None):
        trainer(pl, max_epochs=1, callbacks=[mon, Steps()]).fit(model or make_module(pl, batchnorm=False), loader(x, y))

    with pytest.raises(ValueError, match=r"non-negative.*\['fc1'\].*ReLU"):
        fit(SelectivityMonitor(["fc1", "relu1"], num_samples=64))
    tuple_out = make_module(pl)
    tuple_out.forward = lambda inp, f=tuple_out.forward: (f(inp), None)
    with pytest.raises(ValueError, match=r"class scores.*tuple or dict.*Override `forward"):
        fit(RelianceMonitor(["relu1"], num_samples=64, num_classes=10), tuple_out)
    one_logit = make_module(pl)
    one_logit.forward = lambda inp, f=one_logit.forward: f(inp)[:, :1]
    with pytest.raises(ValueError, match=r"binary logit z: `torch.cat\(\[-z, z\], 1\)`"):
        fit(RelianceMonitor(["relu1"], num_samples=64, num_classes=10), one_logit)
    with pytest.raises(ValueError, match="cannot load the reference checkpoint '/nonexistent/ref.ckpt'"):
        fit(ConvergenceMonitor(["relu1"], num_samples=80, reference="/nonexistent/ref.ckpt"))
    assert Steps.n == 0  # all of them before the first training step
    # mutual information is defined for signed layers: there only selectivity is skipped
    mon = SelectivityMonitor(["fc1"], num_samples=64, mutual_info=True)
    tr = trainer(pl, max_epochs=1, callbacks=[mon])
    with pytest.warns(RuntimeWarning, match="selectivity for layer 'fc1' skipped"):
        tr.fit(make_module(pl, batchnorm=False), loader(x, y))
    assert "netprobe/mutual_info_mean/fc1" in tr.callback_metrics and "netprobe/selectivity_mean" not in tr.callback_metrics


def test_a_diverged_network_logs_nan_reliance_and_training_stops(tmp_path):
    import pytorch_lightning as pl

    x, y = digits(100)
    model = make_module(pl, batchnorm=False)
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN on `data` before any ablation.*not finite"):
        ablation_curve(model, "relu1", (x, y))

    class Diverge(pl.Callback):  # epoch 0 is fine; from epoch 1 on, the weights are NaN
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    pl_module.fc1.weight[0, 0] = float("nan")

    from netprobe.lightning import RelianceEarlyStopping

    # NaN, not a missing (stale-looking) key: early stopping stops there, warm-up or not, plain
    # EarlyStopping too (check_finite), and ModelCheckpoint never keeps that epoch
    for stopper in (RelianceEarlyStopping(patience=3, min_probe_accuracy=0.99),
                    pl.callbacks.EarlyStopping(monitor="netprobe/reliance_auc", mode="max", patience=3)):
        rec = Recorder(pl)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / type(stopper).__name__), monitor="netprobe/reliance_auc", mode="max")
        tr = trainer(pl, max_epochs=4, enable_checkpointing=True,
                     callbacks=[Diverge(), RelianceMonitor(["relu1"], num_samples=64, repeats=1), stopper, ckpt, rec.cb])
        with pytest.warns(RuntimeWarning, match="reliance for layer 'relu1' skipped.*NaN"):
            tr.fit(make_module(pl, batchnorm=False), loader(x, y))
        assert math.isfinite(rec.epochs[0]["netprobe/reliance_auc"]) and math.isfinite(rec.epochs[0]["netprobe/probe_accuracy"])
        assert math.isnan(rec.epochs[1]["netprobe/reliance_auc"]) and math.isnan(rec.epochs[1]["netprobe/probe_accuracy"])
        assert len(rec.epochs) == 2 and stopper.stopped_epoch == 1
        assert "epoch=0" in ckpt.best_model_path


def test_a_monitor_reused_for_a_new_model_starts_afresh_and_bf16_models_work():
    import pytorch_lightning as pl

    x, y = digits(200)
    mon = ConvergenceMonitor(["relu1"], num_samples=100, methods=("cka",))
    trainer(pl, max_epochs=2, callbacks=[mon]).fit(make_module(pl), loader(x, y))
    first = mon.state_dict()["probe_indices"].clone()
    assert pickle.loads(pickle.dumps(mon)).state_dict()["probe_indices"].equal(first)  # e.g. for ddp_spawn
    rec = Recorder(pl)
    trainer(pl, max_epochs=2, callbacks=[mon, rec.cb]).fit(make_module(pl), loader(x[100:], y[100:]))
    assert "netprobe/cka_prev" not in rec.epochs[0]  # no comparison with the old model's activations
    assert "netprobe/cka_prev" in rec.epochs[1]
    assert mon.state_dict()["probe_indices"].max() < 100 <= first.max()  # drawn from the new, smaller dataset
    sel = SelectivityMonitor(["relu1"], num_samples=64)
    trainer(pl, max_epochs=1, callbacks=[sel]).fit(make_module(pl), loader(x, y))
    three = make_module(pl)
    three.out = nn.Linear(32, 3)
    trainer(pl, max_epochs=1, callbacks=[sel]).fit(three, loader(x, y % 3))
    assert sel.num_classes == 3  # inferred again for the new model
    # precision="bf16-true": the probe inputs follow the model's dtype
    rec = Recorder(pl)
    mons = [SelectivityMonitor(["relu1"], num_samples=64), RelianceMonitor(["relu1"], num_samples=64, repeats=1), rec.cb]
    trainer(pl, max_epochs=1, precision="bf16-true", callbacks=mons).fit(make_module(pl, batchnorm=False), loader(x, y))
    assert {"netprobe/selectivity_mean", "netprobe/reliance_auc"} <= set(rec.epochs[0])


def test_a_layer_with_every_unit_dead_warns_and_keeps_its_dead_fraction():
    import pytorch_lightning as pl

    x, y = digits(100)
    model = make_module(pl, batchnorm=False, lr=0.0)
    with torch.no_grad():
        model.fc1.bias.fill_(-1e3)  # relu1 is zero for every input
    tr = trainer(pl, max_epochs=1, callbacks=[SelectivityMonitor(["relu1", "relu2"], num_samples=64)])
    with pytest.warns(RuntimeWarning, match="selectivity for layer 'relu1' skipped.*every unit was zero"):
        tr.fit(model, loader(x, y))
    cm = tr.callback_metrics
    assert float(cm["netprobe/dead_fraction/relu1"]) == 1.0 and "netprobe/selectivity_mean/relu1" not in cm
