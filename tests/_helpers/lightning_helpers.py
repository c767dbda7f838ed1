"""Small LightningModules and data for the callback tests (kept tiny: the suite must stay fast)."""

import importlib

import torch
from torch import nn


def digits(n=400):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[:n])
    return x, y


def _net_class(pl):
    class Net(pl.LightningModule):
        def __init__(self, dropout=0.2, batchnorm=True, lr=1e-2, width=32):
            super().__init__()
            self.lr = lr
            self.fc1 = nn.Linear(64, width)
            self.bn1 = nn.BatchNorm1d(width) if batchnorm else nn.Identity()
            self.relu1 = nn.ReLU()
            self.drop = nn.Dropout(dropout)
            self.fc2 = nn.Linear(width, width)
            self.relu2 = nn.ReLU()
            self.out = nn.Linear(width, 10)

        def forward(self, x):
            return self.out(self.relu2(self.fc2(self.drop(self.relu1(self.bn1(self.fc1(x)))))))

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    return Net


# module-level classes (picklable, for ddp_spawn), one per installed Lightning package
_NETS = {}
for _name in ("pytorch_lightning", "lightning.pytorch"):
    try:
        _mod = importlib.import_module(_name)
    except ImportError:  # pragma: no cover
        continue
    _cls = _net_class(_mod)
    _cls.__name__ = _cls.__qualname__ = "Net_" + _name.replace(".", "_")
    globals()[_cls.__name__] = _cls
    _NETS[_mod.__name__] = _cls


def make_module(pl, *, dropout=0.2, batchnorm=True, lr=1e-2, width=32):
    return _NETS[pl.__name__](dropout=dropout, batchnorm=batchnorm, lr=lr, width=width)


def loader(x, y, *, batch_size=50, shuffle=True):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def trainer(pl, **kw):
    base = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
                accelerator="cpu", devices=1, deterministic=True)
    base.update(kw)
    return pl.Trainer(**base)
