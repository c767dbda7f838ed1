"""Quickstart, Lightning: three monitors on a Trainer, values in TensorBoard and callback_metrics.

    .venv/bin/python examples/quickstart_lightning.py [--logdir runs/quickstart]
"""

import argparse

import pytorch_lightning as pl

from _common import digits, lightning_mlp, loader, one_thread, quiet_lightning, trainer_kwargs
from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor

ap = argparse.ArgumentParser(description="netprobe quickstart, Lightning")
ap.add_argument("--smoke", action="store_true")
ap.add_argument("--logdir", default="runs/quickstart")
args = ap.parse_args()
print(f"quickstart_lightning.py: {one_thread()}")
quiet_lightning()

data = digits(seed=0)
layers = ["net.relu1", "net.relu2"]
trainer = pl.Trainer(
    max_epochs=2 if args.smoke else 10,
    callbacks=[SelectivityMonitor(layers), RelianceMonitor(layers), ConvergenceMonitor(layers)],
    logger=pl.loggers.TensorBoardLogger(args.logdir),
    **trainer_kwargs(),
)
trainer.fit(lightning_mlp(64, [128, 128], 10), loader(data["x_train"], data["y_train"]))
for key, value in sorted(trainer.callback_metrics.items()):
    if key.startswith("netprobe/") and key.count("/") == 1:
        print(f"{key:<28} {float(value):.4f}")
print(f"tensorboard --logdir {args.logdir}")
