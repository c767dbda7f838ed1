"""RelianceMonitor(layers_per_measurement=k): each measurement ablates the next group of k layers
of a fixed rotation; a layer's values are those the monitor gives it without rotation at the same
epoch; the means over layers come once per rotation, over that rotation's values; the keys not
due keep their last value where Lightning's callbacks read them; a resumed run goes on in the
rotation."""

import pytest

pl = pytest.importorskip("pytorch_lightning")

from lightning_helpers import digits, loader, make_module, trainer  # noqa: E402
from netprobe.lightning import RelianceMonitor  # noqa: E402

LAYERS = ["relu1", "fc2", "relu2"]


class _Seen(pl.Callback):
    """Per epoch: what the monitor logged (its last_values) and the netprobe keys Lightning's callbacks can read."""

    def __init__(self, mon):
        self.mon, self.logged, self.readable = mon, [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.logged.append({k: v for k, v in self.mon.last_values.items() if not k.startswith("netprobe/time/")})
        self.readable.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("netprobe/")})


def _fit(k, epochs, *, ckpt=None, root=None, noise=False):
    pl.seed_everything(0, verbose=False)
    x, y = digits(240)
    mon = RelianceMonitor(LAYERS, num_samples=96, repeats=2, noise=noise, layers_per_measurement=k)
    seen = _Seen(mon)
    cbs = [mon, seen]
    kw = {}
    if root is not None:
        cbs.append(pl.callbacks.ModelCheckpoint(dirpath=str(root), save_last=True, every_n_epochs=1))
        kw = dict(enable_checkpointing=True, default_root_dir=str(root))
    tr = trainer(pl, max_epochs=epochs, callbacks=cbs, **kw)
    tr.fit(make_module(pl, dropout=0.0), loader(x, y, shuffle=False), ckpt_path=ckpt)
    return mon, seen


def _layer_keys(logged, metric="reliance_auc"):
    return sorted(k.rsplit("/", 1)[1] for k in logged if k.startswith(f"netprobe/{metric}/"))


@pytest.mark.parametrize("k, groups", [(1, [["relu1"], ["fc2"], ["relu2"]]), (2, [["relu1", "fc2"], ["relu2"]])])
def test_each_measurement_takes_the_next_group_with_the_values_it_has_without_rotation(k, groups):
    _, plain = _fit(None, 4, noise=True)
    _, rot = _fit(k, 4, noise=True)
    for epoch, logged in enumerate(rot.logged):
        due = groups[epoch % len(groups)]
        assert _layer_keys(logged) == sorted(due) == _layer_keys(logged, "noise_auc"), epoch
        for layer in due:
            for metric in ("reliance_auc", "reliance_area", "noise_auc"):
                key = f"netprobe/{metric}/{layer}"
                assert logged[key] == plain.logged[epoch][key], (epoch, key)
        assert logged["netprobe/probe_accuracy"] == plain.logged[epoch]["netprobe/probe_accuracy"]


def test_the_means_come_once_per_rotation_over_its_values():
    _, rot = _fit(1, 6)
    for epoch, logged in enumerate(rot.logged):
        if epoch % 3 != 2:
            assert "netprobe/reliance_auc" not in logged and "netprobe/reliance_area" not in logged, epoch
            continue
        cycle = [rot.logged[e] for e in range(epoch - 2, epoch + 1)]
        for metric in ("reliance_auc", "reliance_area"):
            vals = [c[f"netprobe/{metric}/{layer}"] for c, layer in zip(cycle, LAYERS)]
            assert logged[f"netprobe/{metric}"] == pytest.approx(sum(vals) / 3, abs=1e-12), (epoch, metric)
        assert logged["netprobe/best/reliance_auc"] >= logged["netprobe/reliance_auc"]


def test_keys_not_due_keep_their_last_value_for_lightnings_callbacks():
    _, rot = _fit(1, 4)
    # epoch 1 measured fc2 only: relu1's key still reads epoch 0's value; relu2 was never measured
    assert rot.readable[1]["netprobe/reliance_auc/relu1"] == pytest.approx(rot.logged[0]["netprobe/reliance_auc/relu1"])
    assert "netprobe/reliance_auc/relu2" not in rot.readable[1]
    assert "netprobe/reliance_auc" not in rot.readable[1]
    # after the first rotation the mean stays readable until the next one replaces it
    assert rot.readable[3]["netprobe/reliance_auc"] == pytest.approx(rot.logged[2]["netprobe/reliance_auc"])
    assert set(rot.readable[3]) >= {f"netprobe/reliance_auc/{layer}" for layer in LAYERS}


def test_a_resumed_run_goes_on_in_the_rotation(tmp_path):
    _, whole = _fit(1, 5)
    _fit(1, 2, root=tmp_path)  # stops inside the first rotation (relu1, fc2 measured)
    _, resumed = _fit(1, 5, ckpt=str(tmp_path / "last.ckpt"))
    assert _layer_keys(resumed.logged[0]) == ["relu2"]
    def signals(logged):  # the facts (layer_index, ...) are logged once per fit
        return {k: v for k, v in logged.items() if not k.startswith("netprobe/layer_")}

    for a, b in zip(whole.logged[2:], resumed.logged):
        assert signals(a) == pytest.approx(signals(b), abs=1e-12)
    assert "netprobe/reliance_auc" in resumed.logged[0]  # the rotation's earlier values came with the state


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_layers_per_measurement_must_be_a_positive_int(bad):
    with pytest.raises((ValueError, TypeError), match="layers_per_measurement"):
        RelianceMonitor(LAYERS, layers_per_measurement=bad)


def test_a_group_larger_than_the_layers_measures_them_all():
    _, big = _fit(5, 2)
    _, plain = _fit(None, 2)
    for a, b in zip(big.logged, plain.logged):
        assert {k: v for k, v in a.items() if "best" not in k} == pytest.approx({k: v for k, v in b.items() if "best" not in k})


def test_the_media_redrawn_at_the_end_are_the_last_groups_and_keep_the_rotation(tmp_path, monkeypatch):
    from netprobe import viz

    drawn = []
    orig = viz.curves_figure

    def recording(curves, **kw):
        drawn.append(sorted(curves))
        return orig(curves, **kw)

    monkeypatch.setattr(viz, "curves_figure", recording)

    class StopAfterEpoch1(pl.Callback):  # after the monitor's measurement, whose media were then not due
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    pl.seed_everything(0, verbose=False)
    x, y = digits(240)
    mon = RelianceMonitor(LAYERS, num_samples=96, repeats=2, layers_per_measurement=1)
    tr = trainer(pl, max_epochs=5, callbacks=[mon, StopAfterEpoch1()], logger=pl.loggers.TensorBoardLogger(str(tmp_path)))
    tr.fit(make_module(pl, dropout=0.0), loader(x, y, shuffle=False))
    assert drawn == [["relu1"], ["fc2"]]  # the first measurement's media, then the last one's group again at the end
    rotation = mon.state_dict()["extra"]["rotation"]
    assert rotation["measurements"] == 2
    assert sorted(rotation["values"]["reliance_auc"]) == ["fc2", "relu1"]


def _fit_with(callbacks, epochs=2):
    pl.seed_everything(0, verbose=False)
    x, y = digits(240)
    tr = trainer(pl, max_epochs=epochs, callbacks=callbacks)
    tr.fit(make_module(pl, dropout=0.0), loader(x, y, shuffle=False))
    return tr


@pytest.mark.parametrize("key", ["netprobe/reliance_auc", "netprobe/reliance_auc/fc2"])
def test_a_strict_early_stopping_on_a_key_not_logged_at_epoch_0_is_refused_before_the_first_step(key):
    mon = RelianceMonitor(LAYERS, num_samples=96, repeats=2, layers_per_measurement=1)
    stop = pl.callbacks.EarlyStopping(monitor=key, mode="max", strict=True)
    with pytest.raises(ValueError, match=r"strict=True\) would end the run with an error at the end of epoch 0.*strict=False"):
        _fit_with([mon, stop])
    assert mon._last_epoch == -1  # nothing was measured: refused in setup


def test_a_strict_early_stopping_on_the_first_groups_key_or_a_lenient_one_runs():
    first = pl.callbacks.EarlyStopping(monitor="netprobe/reliance_auc/relu1", mode="max", strict=True, patience=10)
    lenient = pl.callbacks.EarlyStopping(monitor="netprobe/reliance_auc", mode="max", strict=False, patience=10)
    tr = _fit_with([RelianceMonitor(LAYERS, num_samples=96, repeats=2, layers_per_measurement=1), first, lenient], epochs=3)
    assert tr.current_epoch == 3


def test_a_strict_early_stopping_that_checks_after_validation_every_other_epoch_is_not_refused():
    # Lightning then checks at the validation's end, at epochs 1, 3, ...: the means are logged by epoch 1
    stop = pl.callbacks.EarlyStopping(monitor="netprobe/reliance_auc", mode="max", strict=True, patience=10)
    pl.seed_everything(0, verbose=False)
    x, y = digits(240)
    tr = trainer(pl, max_epochs=2, check_val_every_n_epoch=2,
                 callbacks=[RelianceMonitor(["relu1", "relu2"], num_samples=96, repeats=2, layers_per_measurement=1), stop])
    tr.fit(make_module(pl, dropout=0.0), loader(x, y, shuffle=False), loader(x[:100], y[:100], shuffle=False))
    assert tr.current_epoch == 2 and "netprobe/reliance_auc" in tr.callback_metrics


def test_a_layer_skipped_in_a_rotation_is_named_when_the_rotations_mean_leaves_it_out(monkeypatch):
    import netprobe.lightning.reliance as reliance_module

    orig = reliance_module.ablation_curve

    def failing_for_fc2(model, layer, *a, **kw):
        if layer == "module.fc2" and kw.get("distributed"):  # at the measurements (the check before the first step passes)
            raise ValueError("fc2 cannot be ablated today")
        return orig(model, layer, *a, **kw)

    monkeypatch.setattr(reliance_module, "ablation_curve", failing_for_fc2)
    with pytest.warns(RuntimeWarning) as record:
        _, rot = _fit(1, 3)
    texts = [str(w.message) for w in record if "RelianceMonitor" in str(w.message)]
    assert any("reliance for layer 'fc2' skipped this epoch: fc2 cannot be ablated today" in t for t in texts), texts
    assert any("cover 2 of 3 layers" in t and "without 'fc2'" in t for t in texts), texts
    assert not any("not logged this epoch" in t for t in texts), texts  # a mean is never due before the rotation's end
    want = (rot.logged[0]["netprobe/reliance_auc/relu1"] + rot.logged[2]["netprobe/reliance_auc/relu2"]) / 2
    assert rot.logged[2]["netprobe/reliance_auc"] == pytest.approx(want, abs=1e-12)
