"""The two tasks the epoch benchmarks measure, as LightningModules with their training data.

* ``demo``: the MLP of ``examples/demo.py`` (64-128-128-10) on 1200 of scikit-learn's digits,
  batch 64; monitored layers ``relu1``, ``relu2``.
* ``convnet``: a 1-D ConvNet (Conv1d 1-32-64-64, kernel 5, same padding, ReLUs, then a Linear on
  the flattened 64 x 40 map) on 4000 MNIST-1D examples generated locally, batch 64; monitored
  layers ``relu1``, ``relu2``, ``relu3``.
* ``resnet``: a ResNet-18-style 2-D CNN written here (:class:`ResNet18`: a 3x3 stem, four stages of
  two basic blocks with batch norm, widths ``w, 2w, 4w, 8w``, global average pooling, a Linear),
  on 32 x 32 x 3 images: scikit-learn's 8 x 8 digits upsampled (bilinear), 1200 for training,
  batch 64; monitored layers ``layer2``, ``layer3``, ``layer4`` (the stages' outputs, 16 x 16,
  8 x 8, 4 x 4 positions). ``RESNET_WIDTH`` (default 16) sets ``w``; torchvision's ResNet-18 has
  ``w = 64`` (16 times the arithmetic).
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


#: the ResNet task's base width ``w`` (64: torchvision's ResNet-18; 16 keeps a CPU epoch to seconds)
RESNET_WIDTH = 16


class BasicBlock(nn.Module):
    """Two 3x3 conv + batch norm layers with a ReLU between and after; a 1x1 conv + batch norm on the
    shortcut where the stride or the width changes (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet18(pl.LightningModule):
    """ResNet-18 for 32 x 32 inputs (the CIFAR variant: 3x3 stem, no max pooling), base width
    ``width``; the stages ``layer1``-``layer4`` (each an ``nn.Sequential`` of two blocks)."""

    def __init__(self, lr: float = 1e-3, width: int = 0, num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        w = width or RESNET_WIDTH
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        stages, c = [], w
        for i, (c_out, stride) in enumerate([(w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)], 1):
            stages.append((f"layer{i}", nn.Sequential(BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1))))
            c = c_out
        for name, stage in stages:
            setattr(self, name, stage)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(h.mean((2, 3)))

    training_step = MLP.training_step
    configure_optimizers = MLP.configure_optimizers


def digits_32px(seed: int = 0, n_train: int = 1200) -> Dict[str, torch.Tensor]:
    """scikit-learn's digits as 3 x 32 x 32 images: each 8 x 8 image upsampled (bilinear) and
    copied to three channels, the channels scaled by 1.0, 0.8 and 0.6."""
    d = digits(seed=seed, n_train=n_train)
    out = {}
    for k, v in d.items():
        if k.startswith("x"):
            img = nn.functional.interpolate(v.reshape(-1, 1, 8, 8), size=(32, 32), mode="bilinear", align_corners=False)
            v = img * torch.tensor([1.0, 0.8, 0.6]).reshape(1, 3, 1, 1)
        out[k] = v
    return out


def task(name: str, seed: int = 0) -> Tuple[type, torch.utils.data.DataLoader, List[str], Dict[str, torch.Tensor]]:
    """``(module class, training DataLoader, monitored layers, data dict)`` of a task."""
    if name == "demo":
        d = digits(seed=0, n_train=1200)
        cls, layers = MLP, ["relu1", "relu2"]
    elif name == "convnet":
        d = mnist1d(seed=0, num_samples=5000)
        d = {k: v[:4000] if k.endswith("train") else v for k, v in d.items()}
        cls, layers = ConvNet1d, ["relu1", "relu2", "relu3"]
    elif name == "resnet":
        d = digits_32px(seed=0, n_train=1200)
        cls, layers = ResNet18, ["layer2", "layer3", "layer4"]
    else:
        raise ValueError(f"unknown task {name!r}")
    ds = torch.utils.data.TensorDataset(d["x_train"], d["y_train"])
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return cls, loader, layers, d
