"""Trains a small net under Lightning's ``ModelParallelStrategy`` with torch's FSDP2
(``fully_shard`` in ``configure_model``) on 2 CPU processes over gloo, with the three monitors,
and writes rank 0's logged netprobe values as JSON (``python tests/_helpers/fsdp2_run.py OUT.json N
[fail]``; N: the probe-set size; ``fail``: rank 1's model raises at the first measurement).

Lightning's subprocess launcher re-runs this script for rank 1, which is why it is a script and
not a pytest function (tests/lightning/test_fsdp2.py runs it). With 1 as the number of devices (``single``
as a fourth argument) it runs the same model in one process without sharding.
"""

import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))


def run(out_path, num_samples, *, fail=False, single=False):
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy

    from lightning_helpers import digits, loader
    from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor

    torch.set_num_threads(1)

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.relu1 = nn.Linear(64, 32), nn.ReLU()
            self.fc2, self.relu2 = nn.Linear(32, 32), nn.ReLU()
            self.out = nn.Linear(32, 10)
            self.measuring = False

        def configure_model(self):
            if single:
                return
            from torch.distributed.fsdp import fully_shard

            for m in (self.fc1, self.fc2, self.out):
                fully_shard(m)
            fully_shard(self)

        def forward(self, x):
            if fail and not self.training and self.trainer.global_rank == 1 and self.trainer.current_epoch == 0 \
                    and self.trainer.global_step > 0:
                raise RuntimeError("rank 1 fails on purpose")
            return self.out(self.relu2(self.fc2(self.relu1(self.fc1(x)))))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # frozen: the same weights in every run

    x, y = digits(240)
    mons = [SelectivityMonitor(["relu1", "relu2"], num_samples=num_samples, mutual_info=True),
            RelianceMonitor(["relu1", "relu2"], num_samples=num_samples, repeats=2),
            ConvergenceMonitor(["relu1", "relu2"], num_samples=num_samples)]
    strategy = "auto" if single else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                            process_group_backend="gloo")
    tr = pl.Trainer(accelerator="cpu", devices=1 if single else 2, strategy=strategy, max_epochs=2, callbacks=mons,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    import torch.distributed as dist

    try:
        tr.fit(Net(), loader(x, y, batch_size=40, shuffle=False))
        vals = {k: float(v) for k, v in tr.callback_metrics.items() if k.startswith("netprobe/") and "/time/" not in k}
        result = {"values": vals}
    except Exception as e:  # noqa: BLE001 - reported to the test
        result = {"error": f"{type(e).__name__}: {e}"}
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), fail="fail" in sys.argv[3:], single="single" in sys.argv[3:])
