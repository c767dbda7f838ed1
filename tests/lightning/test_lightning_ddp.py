"""Under DDP (2 CPU processes, gloo) the monitors log the single-process values of the same probe set,
with RelianceMonitor measuring every layer or them in a rotation (every rank takes the same group)."""

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from lightning_helpers import digits, loader, make_module, trainer  # noqa: E402
from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor  # noqa: E402

KEYS = ("netprobe/selectivity_mean", "netprobe/selectivity_mean/relu1", "netprobe/mutual_info_mean",
        "netprobe/reliance_auc", "netprobe/reliance_auc/relu2", "netprobe/noise_auc",
        "netprobe/pwcca_ref", "netprobe/svcca_ref", "netprobe/cka_ref", "netprobe/pwcca_prev")


class _SyncedTeardown(pl.Callback):
    """Both ranks leave together and close the gloo group themselves: Lightning's atexit teardown
    without a barrier sometimes aborts one rank (SIGABRT) when the other has already gone."""

    def teardown(self, trainer, pl_module, stage):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class _SameOrdersOnEveryRank(pl.Callback):
    """Fails the run unless every rank holds the same fixed ablation orders as rank 0."""

    def __init__(self, monitor):
        self.monitor = monitor

    def on_train_end(self, trainer, pl_module):
        import torch.distributed as dist

        orders = self.monitor.state_dict()["extra"]["orders"]
        assert set(orders) == {"relu1", "relu2"}
        if dist.is_available() and dist.is_initialized():
            got = [None] * dist.get_world_size()
            dist.all_gather_object(got, orders)
            for other in got:
                assert all(torch.equal(other[k], orders[k]) for k in orders), "ranks hold different orders"


def _run(strategy, devices, rotate=None):
    pl.seed_everything(0, verbose=False)
    x, y = digits(240)
    model = make_module(pl, dropout=0.0, batchnorm=False, lr=0.0)  # lr=0: same weights in both runs
    pl.seed_everything(1, verbose=False)
    ref = make_module(pl, dropout=0.0, batchnorm=False)
    mons = [
        SelectivityMonitor(["relu1", "relu2"], num_samples=101, mutual_info=True),  # odd n: unequal shards
        RelianceMonitor(["relu1", "relu2"], num_samples=101, noise=True, repeats=2, order="random",
                        layers_per_measurement=rotate),
        ConvergenceMonitor(["relu1", "relu2"], num_samples=101, reference=ref, methods=("pwcca", "svcca", "cka")),
    ]
    tr = trainer(pl, max_epochs=2, strategy=strategy, devices=devices,
                 callbacks=[*mons, _SameOrdersOnEveryRank(mons[1]), _SyncedTeardown()])
    tr.fit(model, loader(x, y, batch_size=40, shuffle=False))
    return {k: float(v) for k, v in tr.callback_metrics.items()}


@pytest.mark.slow
@pytest.mark.parametrize("rotate", [None, 1])
def test_ddp_values_equal_single_process(rotate):
    single = _run("auto", 1, rotate)
    ddp = _run("ddp_spawn", 2, rotate)
    for k in KEYS + ("netprobe/reliance_auc/relu1",):  # with the rotation, relu1's from epoch 0, relu2's and the means from epoch 1
        assert k in single and k in ddp, k
        assert ddp[k] == pytest.approx(single[k], abs=1e-6), k
