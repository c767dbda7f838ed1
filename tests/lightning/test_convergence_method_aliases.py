"""ConvergenceMonitor accepts a function's name for its method (``"linear_cka"`` for ``"cka"``):
the same values under the same keys (``cka_prev``)."""

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from lightning_helpers import digits, loader, make_module, trainer  # noqa: E402
from netprobe.lightning import ConvergenceMonitor  # noqa: E402


def _fit(methods):
    torch.manual_seed(0)
    x, y = digits(200)
    model = make_module(pl, dropout=0.0, batchnorm=False)
    mon = ConvergenceMonitor(["relu1", "relu2"], methods=methods, probe_data=(x[:80], y[:80]))
    trainer(pl, max_epochs=2, callbacks=[mon]).fit(model, loader(x, y, shuffle=False))
    return mon


def test_alias_gives_the_same_keys_and_values():
    by_alias, by_name = _fit(("linear_cka", "procrustes")), _fit(("cka", "procrustes"))
    assert by_alias.methods == ("cka", "procrustes") and by_alias.metrics == ("cka_prev", "procrustes_prev")
    drop_time = lambda v: {k: x for k, x in v.items() if not k.startswith("netprobe/time/")}  # noqa: E731
    assert drop_time(by_alias.last_values) == drop_time(by_name.last_values)
    assert "netprobe/cka_prev/relu1" in by_alias.last_values


def test_alias_and_name_together_are_one_method():
    assert ConvergenceMonitor(["relu1"], methods=("cka", "linear_cka")).metrics == ("cka_prev",)
    assert ConvergenceMonitor(["relu1"], methods="linear_cka").metrics == ("cka_prev",)


def test_unknown_method_lists_the_known_ones_and_the_alias():
    with pytest.raises(ValueError, match=r"among \['pwcca', 'svcca', 'cka', 'procrustes', 'rbf_cka', 'cka_debiased'\], "
                                         r"but got \['cosine'\] \(a function's name is also accepted: 'linear_cka' for 'cka'\)\.$"):
        ConvergenceMonitor(["relu1"], methods=("cosine",))
