"""Shared helpers for the examples: offline data, label corruption, small MLPs, a plain training loop.

Data ships offline: scikit-learn's `load_digits`, and MNIST-1D *generated locally* with the
`mnist1d` package's generation functions (`make_dataset`; its `get_dataset()` downloads, and is
never used here).
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Sequence, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

Data = Dict[str, torch.Tensor]


def one_thread() -> str:
    """Use one torch thread (2-core machines slow down badly with more) and say so."""
    torch.set_num_threads(1)
    return f"torch {torch.__version__}, torch threads = {torch.get_num_threads()} (set to 1 on purpose)"


def digits(seed: int = 0, n_train: int = 1200) -> Data:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), scaled to [0, 1], split by `seed`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}


def mnist1d(seed: int = 0, num_samples: int = 5000) -> Data:
    """MNIST-1D (Greydanus 2020) generated locally: 40-sample 1-D signals, 10 classes, 80/20 split."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    d = make_dataset(args)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {
        "x_train": f(d["x"]), "y_train": torch.tensor(d["y"], dtype=torch.long),
        "x_test": f(d["x_test"]), "y_test": torch.tensor(d["y_test"], dtype=torch.long),
    }


def corrupt_labels(y: torch.Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Replace a `fraction` of the labels by labels drawn uniformly at random (Zhang et al. 2017)."""
    y = y.clone()
    n = len(y)
    idx = torch.randperm(n, generator=generator)[: int(round(fraction * n))]
    y[idx] = torch.randint(0, num_classes, (len(idx),), generator=generator)
    return y


def mlp(d_in: int, widths: Sequence[int], d_out: int, *, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    """An MLP whose hidden ReLUs are named `relu1`, `relu2`, ... (the layers the examples probe)."""
    layers = []
    prev = d_in
    for i, w in enumerate(widths, 1):
        layers.append((f"fc{i}", nn.Linear(prev, w)))
        if batchnorm:
            layers.append((f"bn{i}", nn.BatchNorm1d(w)))
        layers.append((f"relu{i}", nn.ReLU()))
        if dropout:
            layers.append((f"drop{i}", nn.Dropout(dropout)))
        prev = w
    layers.append(("out", nn.Linear(prev, d_out)))
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(layers))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).double().mean().item()
    model.train(was)
    return acc


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    generator: Optional[torch.Generator] = None,
    stop_at_train_acc: Optional[float] = None,
) -> int:
    """Adam, shuffled minibatches from `generator`; stops early once train accuracy reaches the target.

    Returns the number of epochs run.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(x)
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            b = perm[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if stop_at_train_acc is not None and epoch % 5 == 0 and accuracy(model, x, y) >= stop_at_train_acc:
            return epoch
    return epochs


def lightning_mlp(d_in: int, widths: Sequence[int], d_out: int, *, lr: float = 1e-3, weight_decay: float = 0.0,
                  dropout: float = 0.0, batchnorm: bool = False, optimizer: str = "adam"):
    """A LightningModule wrapping :func:`mlp` (hidden ReLUs named ``net.relu1``, ``net.relu2``, ...)."""
    import pytorch_lightning as pl

    class LitMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(d_in, widths, d_out, dropout=dropout, batchnorm=batchnorm)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train/loss", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self):
            if optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
            return torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)

    return LitMLP()


def quiet_lightning() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, shuffle: bool = True, seed: int = 0):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(seed))


def trainer_kwargs(**kw):
    base = dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                accelerator="cpu", devices=1)
    base.update(kw)
    return base


# ---------------------------------------------------------------- findings with intervals
def t_interval(values: Sequence[float], *, level: float = 0.95) -> Tuple[float, float, float]:
    """Mean and t-based confidence interval of the mean; NaN bounds for fewer than 2 values."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.5 + level / 2, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def verdict(lo: float, hi: float, *, margin: float, n: int) -> str:
    """'yes' if the interval lies above 0 by more than `margin`, 'no' if below by more, else unresolved."""
    if math.isfinite(lo) and math.isfinite(hi):
        if lo > margin:
            return "yes"
        if hi < -margin:
            return "no"
    return f"not resolved at {n} seeds"
