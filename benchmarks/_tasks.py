"""The two tasks the epoch benchmarks measure, as LightningModules with their training data.

* ``demo``: the MLP of ``examples/demo.py`` (64-128-128-10) on 1200 of scikit-learn's digits,
  batch 64; monitored layers ``relu1``, ``relu2``.
* ``convnet``: a 1-D ConvNet (Conv1d 1-32-64-64, kernel 5, same padding, ReLUs, then a Linear on
  the flattened 64 x 40 map) on 4000 MNIST-1D examples generated locally, batch 64; monitored
  layers ``relu1``, ``relu2``, ``relu3``.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Tuple

import pytorch_lightning as pl
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from _common import digits, mnist1d  # noqa: E402
from demo import MLP  # noqa: E402


class ConvNet1d(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1, self.relu1 = nn.Conv1d(1, 32, 5, padding=2), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv1d(32, 64, 5, padding=2), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv1d(64, 64, 5, padding=2), nn.ReLU()
        self.out = nn.Linear(64 * 40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x[:, None]
        h = self.relu3(self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(x))))))
        return self.out(h.flatten(1))

    # the demo MLP's: cross-entropy, logged as train/loss; Adam at hparams.lr
    training_step = MLP.training_step
    configure_optimizers = MLP.configure_optimizers


def task(name: str, seed: int = 0) -> Tuple[type, torch.utils.data.DataLoader, List[str], Dict[str, torch.Tensor]]:
    """``(module class, training DataLoader, monitored layers, data dict)`` of a task."""
    if name == "demo":
        d = digits(seed=0, n_train=1200)
        cls, layers = MLP, ["relu1", "relu2"]
    elif name == "convnet":
        d = mnist1d(seed=0, num_samples=5000)
        d = {k: v[:4000] if k.endswith("train") else v for k, v in d.items()}
        cls, layers = ConvNet1d, ["relu1", "relu2", "relu3"]
    else:
        raise ValueError(f"unknown task {name!r}")
    ds = torch.utils.data.TensorDataset(d["x_train"], d["y_train"])
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return cls, loader, layers, d
