"""Small models of common architectures for tests/models/test_zoo.py (a model zoo).

Every model takes batch-first inputs and, unless said otherwise, returns class scores
``(batch, num_classes)``. Each is a few thousand parameters at most, so that the zoo runs in
seconds on 2 CPU cores with one torch thread.

Run as a script (``python tests/_helpers/zoo_models.py fsdp OUT.json``) it trains the ResNet under
Lightning's FSDP strategy on the CPU with 2 processes (Lightning's subprocess launcher re-runs
this script for rank 1, which is why it lives here and not inside pytest).
"""

import dataclasses
import json
import sys

import torch
from torch import nn
from torch.nn import functional as F


# --------------------------------------------------------------------------- data
def digits_images(n=200):
    """scikit-learn's digits as (n, 1, 8, 8) images in [0, 1] and labels 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32).reshape(n, 1, 8, 8) / 16.0
    return x, torch.tensor(d.target[:n])


def digits_sequences(n=200):
    """Digits as sequences: 8 time steps (rows) of 8 features, (n, 8, 8); labels 0..9."""
    x, y = digits_images(n)
    return x[:, 0], y


def digits_signals(n=200):
    """Digits as 1-D signals with 2 channels of length 32, (n, 2, 32); labels 0..9."""
    x, y = digits_images(n)
    return x.reshape(n, 2, 32), y


def padded_sequences(n=200, *, seed=0):
    """Digit sequences whose trailing rows are zero padding (lengths 5..8), and the padding mask."""
    x, y = digits_sequences(n)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 9, (n,), generator=g)
    pad = torch.arange(8)[None, :] >= lengths[:, None]  # (n, T) True = padding
    return x.masked_fill(pad[..., None], 0.0), y, pad


# --------------------------------------------------------------------------- 1. 2-D ResNet
class BasicBlock2d(nn.Module):
    """``relu(bn(conv(x)) + x)``: the ReLU is a module applied after the residual sum."""

    def __init__(self, c, bn_momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c, momentum=bn_momentum)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


class ResNet2d(nn.Module):
    """``bn_momentum=0`` freezes the running statistics (a model that does not change with lr=0)."""

    def __init__(self, c=8, num_classes=10, bn_momentum=0.1):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c, momentum=bn_momentum)
        self.relu = nn.ReLU()
        self.block1 = BasicBlock2d(c, bn_momentum)
        self.block2 = BasicBlock2d(c, bn_momentum)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        h = self.block2(self.block1(self.relu(self.bn(self.stem(x)))))
        return self.fc(self.pool(h).flatten(1))


# --------------------------------------------------------------------------- 2. 1-D residual net
class ResBlock1d(nn.Module):
    """``relu(conv(x) + x)`` as a module."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x) + x)


class ResNet1d(nn.Module):
    """A residual block as a module (``block``) and one written inline (``conv2``, ``act2``)."""

    def __init__(self, c=8, num_classes=10):
        super().__init__()
        self.stem = nn.Conv1d(2, c, 3, padding=1)
        self.act1 = nn.ReLU()
        self.block = ResBlock1d(c)
        self.conv2 = nn.Conv1d(c, c, 3, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        h = self.block(self.act1(self.stem(x)))
        h = self.act2(self.conv2(h) + h)  # inline residual: the ReLU after a sum
        return self.fc(h.mean(2))


# --------------------------------------------------------------------------- 3. transformer encoder
class TransformerClassifier(nn.Module):
    """Batch-first input (N, T, D); an ``nn.TransformerEncoder`` of either layout inside.

    With ``masked=True`` trailing all-zero time steps are padding (``src_key_padding_mask``)."""

    def __init__(self, *, batch_first, masked=False, nested=False, d=8, num_classes=10):
        super().__init__()
        self.inner_batch_first, self.masked = batch_first, masked
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.hidden = nn.Linear(d, 16)
        self.act = nn.ReLU()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        mask = (x.abs().sum(-1) == 0) if self.masked else None
        h = self.enc(x if self.inner_batch_first else x.transpose(0, 1), src_key_padding_mask=mask)
        h = h if self.inner_batch_first else h.transpose(0, 1)  # (N, T, D)
        if mask is not None:
            keep = (~mask).unsqueeze(-1).to(h.dtype)
            h = (h * keep).sum(1) / keep.sum(1)
        else:
            h = h.mean(1)
        return self.fc(self.act(self.hidden(h)))


# --------------------------------------------------------------------------- 4. recurrent nets
class RNNClassifier(nn.Module):
    def __init__(self, cls=nn.LSTM, *, batch_first, d=8, hidden=12, num_classes=10):
        super().__init__()
        self.inner_batch_first = batch_first
        self.rnn = cls(d, hidden, batch_first=batch_first)
        self.act = nn.ReLU()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        out, _ = self.rnn(x if self.inner_batch_first else x.transpose(0, 1))
        out = out if self.inner_batch_first else out.transpose(0, 1)  # (N, T, H)
        return self.fc(self.act(out.mean(1)))


# --------------------------------------------------------------------------- 5. attention
class AttentionClassifier(nn.Module):
    def __init__(self, *, batch_first=False, d=8, num_classes=10):
        super().__init__()
        self.inner_batch_first = batch_first
        self.att = nn.MultiheadAttention(d, 2, batch_first=batch_first)
        self.hidden = nn.Linear(d, 16)
        self.act = nn.ReLU()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        s = x if self.inner_batch_first else x.transpose(0, 1)
        a, _ = self.att(s, s, s)
        a = a if self.inner_batch_first else a.transpose(0, 1)
        return self.fc(self.act(self.hidden(a.mean(1))))


# --------------------------------------------------------------------------- 6. structured outputs
class MLPBody(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(32, num_classes)

    def logits(self, x):
        return self.fc2(self.relu1(self.fc1(x.flatten(1))))


class DictOutputModel(MLPBody):
    """Returns ``{"logits": (N, C), "features": (N, 32)}``."""

    def forward(self, x):
        h = self.relu1(self.fc1(x.flatten(1)))
        return {"logits": self.fc2(h), "features": h}


@dataclasses.dataclass
class ClassifierOutput:
    """A HuggingFace-style model output: a dataclass with ``.logits``."""

    logits: torch.Tensor
    loss: torch.Tensor = None


class HFStyleModel(MLPBody):
    def forward(self, x, labels=None):
        logits = self.logits(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(logits=logits, loss=loss)


def logits_of(out):
    """The class scores of any zoo model's output (a tensor, a dict, or an output object)."""
    if isinstance(out, dict):
        return out["logits"]
    return getattr(out, "logits", out)


# --------------------------------------------------------------------------- Lightning wrapper
def lit_class(pl):
    class Lit(pl.LightningModule):
        """Wraps a zoo model as ``self.net``; the monitored layers are ``net.<name>``."""

        def __init__(self, net, lr=0.05):
            super().__init__()
            self.net, self.lr = net, lr

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            loss = F.cross_entropy(logits_of(self(x)), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    return Lit


def loader(x, y, *, batch_size=40, shuffle=True):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


TRAINER_KW = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, max_epochs=2, deterministic=True)

RESNET_LAYERS = ["net.block1", "net.block2", "net.block1.relu"]


def fsdp_run(strategy, devices, lr=0.05, bn_momentum=0.1):
    """The ResNet with the three monitors; returns the logged netprobe values of the last epoch."""
    import pytorch_lightning as pl

    from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    x, y = digits_images(160)
    model = lit_class(pl)(ResNet2d(bn_momentum=bn_momentum), lr=lr)
    mons = [SelectivityMonitor(RESNET_LAYERS, num_samples=64), RelianceMonitor(RESNET_LAYERS, num_samples=64, repeats=2),
            ConvergenceMonitor(RESNET_LAYERS, num_samples=64)]
    tr = pl.Trainer(strategy=strategy, devices=devices, callbacks=mons, **TRAINER_KW)
    tr.fit(model, loader(x, y, shuffle=False))
    return {k: float(v) for k, v in tr.callback_metrics.items() if k.startswith("netprobe/") and "/time/" not in k}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "fsdp":
    from pytorch_lightning.strategies import FSDPStrategy

    vals = fsdp_run(FSDPStrategy(process_group_backend="gloo"), 2, lr=0.0, bn_momentum=0.0)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(vals, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
