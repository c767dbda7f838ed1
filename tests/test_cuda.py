"""On a CUDA device the metrics and the monitors give the CPU's values (skipped without one).

Run on a GPU machine; CI has none. Tolerances: float64 metrics agree to rounding; accuracies and
ablation counts are integers that can differ only where a score ties within float32 rounding."""

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from netprobe.metrics import ablation_curve, linear_cka, noise_curve, pwcca, svcca  # noqa: E402
from netprobe.metrics.similarity import SimilarityAccumulator  # noqa: E402


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 16, 5, padding=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 24, 5))


def _data(n=200):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 24, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def test_similarity_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 64, generator=g)
    b = a @ torch.randn(64, 48, generator=g) + 0.5 * torch.randn(3000, 48, generator=g)
    for fn in (pwcca, svcca, linear_cka):
        cpu, gpu = fn(a, b), fn(a.cuda(), b.cuda())
        assert gpu.device.type == "cuda"
        assert float(gpu) == pytest.approx(float(cpu), abs=1e-10), fn.__name__
    acc = SimilarityAccumulator().update(a.cuda(), b.cuda())
    vals, errors = acc.compute(("pwcca", "svcca", "cka"))
    assert not errors and float(vals["pwcca"]) == pytest.approx(float(pwcca(a, b)), abs=1e-10)


@pytest.mark.parametrize("curve", ["ablation", "noise"])
def test_curves_on_cuda_equal_cpu_and_respect_the_element_bound(curve):
    net, (x, y) = _net(), _data()
    fn = ablation_curve if curve == "ablation" else noise_curve
    kw = dict(repeats=2, max_elements=4096)
    cpu = fn(net, "1", (x, y), generator=torch.Generator().manual_seed(3), **kw)
    seen = []
    gnet = _net().cuda()
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append(o.numel())) for m in gnet.modules()]
    gpu = fn(gnet, "1", (x, y), generator=torch.Generator().manual_seed(3), **kw)
    for h in hooks:
        h.remove()
    assert (gpu.correct - cpu.correct).abs().max() <= 2  # a tie within float32 rounding at most
    assert float(gpu.auc) == pytest.approx(float(cpu.auc), abs=0.02)
    # every stacked pass kept its module outputs within the bound (the plain first batch is the user's)
    assert sorted(seen)[-2] <= max(4096, 200 * 16 * 24)


def test_monitors_on_a_cuda_trainer_log_the_cpu_values(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_helpers import digits, loader, make_module, trainer
    from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor

    def run(accelerator):
        pl.seed_everything(0, verbose=False)
        x, y = digits(240)
        mons = [SelectivityMonitor(["relu1", "relu2"], num_samples=128),
                RelianceMonitor(["relu1", "relu2"], num_samples=128, repeats=2),
                ConvergenceMonitor(["relu1", "relu2"], num_samples=128)]
        tr = trainer(pl, max_epochs=2, accelerator=accelerator, deterministic=False, callbacks=mons)
        tr.fit(make_module(pl, dropout=0.0, batchnorm=False, lr=0.0), loader(x, y, shuffle=False))
        return {k: float(v) for k, v in tr.callback_metrics.items() if k.startswith("netprobe/") and "/time/" not in k}

    cpu, gpu = run("cpu"), run("gpu")
    assert set(cpu) == set(gpu)
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], abs=2e-3), k
