"""SelectivityMonitor(importance=True) on a real Trainer: its rho values equal Spearman's rho
(scipy) of the functional importance and selectivity computed afterwards on the same probe set."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

pl = pytest.importorskip("pytorch_lightning")

from lightning_helpers import digits, loader, make_module, trainer  # noqa: E402
from netprobe.lightning import SelectivityMonitor  # noqa: E402
from netprobe.metrics import class_selectivity, mutual_information, unit_importance  # noqa: E402
from netprobe.capture import probe  # noqa: E402


@pytest.mark.parametrize("by", ["loss_rise", "accuracy_drop"])
def test_importance_rho_matches_the_functions(by):
    torch.manual_seed(0)
    x, y = digits(300)
    px, py = x[:120], y[:120]
    mon = SelectivityMonitor(["relu1", "relu2"], importance=True, importance_by=by, mutual_info=True,
                             probe_data=(px, py), num_samples=120)
    model = make_module(pl, dropout=0.0, batchnorm=False)
    trainer(pl, max_epochs=1, callbacks=[mon]).fit(model, loader(x, y))
    model.eval()
    defined = 0
    for layer in ("relu1", "relu2"):
        imp = unit_importance(model, layer, (px, py))
        with probe(model, [layer]) as p, torch.no_grad():
            model(px)
        sel = class_selectivity(p[layer], py, num_classes=10)
        live = (~sel.dead).numpy()
        values = getattr(imp, by).numpy()[live]
        want = spearmanr(values, sel.values.numpy()[live]).statistic
        key = f"netprobe/importance_selectivity_rho/{layer}"
        if np.isnan(want):
            assert key not in mon.last_values
            continue
        assert mon.last_values[key] == pytest.approx(want, abs=1e-9)
        defined += 1
        mi = mutual_information(p[layer], py, num_classes=10, bins=16)
        want_mi = spearmanr(values, mi.numpy()[live]).statistic
        assert mon.last_values[f"netprobe/importance_mi_rho/{layer}"] == pytest.approx(want_mi, abs=1e-9)
    assert ("netprobe/importance_selectivity_rho" in mon.last_values) == (defined > 0)
    if by == "loss_rise":  # continuous: defined on both layers
        assert defined == 2


def test_importance_needs_class_scores_before_the_first_step():
    class TupleOut(SelectivityMonitor):
        def forward(self, pl_module, x):
            return (pl_module(x),)

    x, y = digits(100)
    mon = TupleOut(["relu1"], importance=True, num_samples=50)
    with pytest.raises(ValueError, match="class scores"):
        trainer(pl, max_epochs=1, callbacks=[mon]).fit(make_module(pl), loader(x, y))


def test_importance_arguments_are_checked():
    with pytest.raises(ValueError, match="importance_by"):
        SelectivityMonitor(["relu1"], importance=True, importance_by="auc")
    with pytest.raises(ValueError, match="importance_mode"):
        SelectivityMonitor(["relu1"], importance=True, importance_mode="noise")
