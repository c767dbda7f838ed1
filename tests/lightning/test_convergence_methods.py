"""ConvergenceMonitor with procrustes and rbf_cka beside CKA: on a real Trainer, the logged
similarity to a fixed reference equals the metric functions on the probe activations, through
the streamed path and through the n x n path for a layer wider than 2/3 of the probe set."""

import copy

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from lightning_helpers import digits, loader, make_module, trainer  # noqa: E402
from netprobe.capture import probe  # noqa: E402
from netprobe.lightning import ConvergenceMonitor  # noqa: E402
from netprobe.metrics import linear_cka, procrustes, rbf_cka  # noqa: E402


@pytest.mark.parametrize("width,methods", [(16, ("cka", "procrustes", "rbf_cka")), (96, ("cka", "procrustes")),
                                           (96, ("procrustes", "rbf_cka", "svcca"))])
def test_procrustes_and_rbf_cka_match_the_functions(width, methods):
    torch.manual_seed(0)
    x, y = digits(300)
    px, py = x[:120], y[:120]  # width 96 > 2/3 of 120: the n x n path when only CKA/Procrustes stream
    model = make_module(pl, dropout=0.0, batchnorm=False, width=width)
    ref = copy.deepcopy(model)
    mon = ConvergenceMonitor(["relu1", "relu2"], methods=methods, reference=ref, probe_data=(px, py), num_samples=120)
    trainer(pl, max_epochs=2, callbacks=[mon]).fit(model, loader(x, y))
    model.eval(), ref.eval()
    fns = {"cka": linear_cka, "procrustes": procrustes, "rbf_cka": rbf_cka}
    for layer in ("relu1", "relu2"):
        with probe(model, [layer]) as p, torch.no_grad():
            model(px)
        with probe(ref, [layer]) as r, torch.no_grad():
            ref(px)
        for m in methods:
            key = f"netprobe/{m}_ref/{layer}"
            assert key in mon.last_values, sorted(mon.last_values)
            assert f"netprobe/{m}_prev/{layer}" in mon.last_values
            if m in fns:
                assert mon.last_values[key] == pytest.approx(float(fns[m](p[layer], r[layer])), abs=1e-6), (m, layer)
            assert 0.0 <= mon.last_values[key] <= 1.0 + 1e-9


def test_unknown_method_lists_the_new_ones():
    with pytest.raises(ValueError, match="procrustes"):
        ConvergenceMonitor(["relu1"], methods=("cosine",))
