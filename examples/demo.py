"""netprobe demo: an MLP on scikit-learn's digits with all three monitors and early stopping on
single-direction reliance (no validation set), logged to TensorBoard.

    make demo                         # sets up .venv, then runs this
    .venv/bin/python examples/demo.py [--epochs 30] [--logdir runs/demo]

Uses one torch thread on purpose: small 2-core machines slow down badly with thread contention.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import netprobe  # noqa: E402
from netprobe.lightning import ConvergenceMonitor, RelianceEarlyStopping, RelianceMonitor, SelectivityMonitor  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


class MLP(pl.LightningModule):
    def __init__(self, width: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1, self.relu1 = nn.Linear(64, width), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(width, width), nn.ReLU()
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu2(self.fc2(self.relu1(self.fc1(x)))))

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class Table(pl.Callback):
    """Prints one line per epoch (after the monitors have written their values)."""

    KEYS = [("reliance", "netprobe/reliance_auc"), ("select.", "netprobe/selectivity_mean"),
            ("MI bits", "netprobe/mutual_info_mean"), ("pwcca_prev", "netprobe/pwcca_prev"), ("cka_prev", "netprobe/cka_prev")]

    def __init__(self, x_test: torch.Tensor, y_test: torch.Tensor) -> None:
        self.x_test, self.y_test = x_test, y_test

    def on_train_start(self, trainer, pl_module):
        print(f"{'epoch':>5} {'loss':>7} {'test acc':>8} " + " ".join(f"{h:>10}" for h, _ in self.KEYS) + f" {'monitors s':>10}")

    def on_train_epoch_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        was = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            acc = (pl_module(self.x_test).argmax(1) == self.y_test).float().mean().item()
        pl_module.train(was)
        secs = sum(float(v) for k, v in m.items() if k.startswith("netprobe/time/"))
        cells = " ".join(f"{float(m[k]):>10.4f}" if k in m else f"{'-':>10}" for _, k in self.KEYS)
        print(f"{trainer.current_epoch:>5} {float(m.get('train/loss', float('nan'))):>7.4f} {acc:>8.3f} {cells} {secs:>10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--logdir", default="runs/demo")
    ap.add_argument("--smoke", action="store_true", help="2 epochs (used by the test suite)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    print(f"netprobe {netprobe.__version__} demo: MLP on load_digits; torch {torch.__version__}, "
          f"torch threads = {torch.get_num_threads()} (1 on purpose)")

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    x_train, y_train, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=64, shuffle=True)

    layers = ["relu1", "relu2"]
    callbacks = [
        SelectivityMonitor(layers, mutual_info=True),              # class selectivity, MI, histograms
        RelianceMonitor(layers),                                    # ablation curves -> reliance_auc
        # similarity to the previous epoch; PWCCA needs more probe examples than twice the width (128)
        ConvergenceMonitor(layers, methods=("pwcca", "cka"), heatmap=True, num_samples=512),
        RelianceEarlyStopping(patience=4, smoothing=0.5, warmup_epochs=3),  # stop on reliance, no val set
        Table(x_test, y_test),
    ]
    logger = pl.loggers.TensorBoardLogger(args.logdir, name="digits_mlp")
    trainer = pl.Trainer(max_epochs=2 if args.smoke else args.epochs, callbacks=callbacks, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu", devices=1)
    t0 = time.perf_counter()
    trainer.fit(MLP(), train)
    stop = callbacks[3]
    print(f"\nstopped after epoch {trainer.current_epoch - 1}"
          + (f" (reliance stopped improving: {stop.stopping_reason_message})" if stop.stopped_epoch else " (max epochs)"))
    print(f"{time.perf_counter() - t0:.1f}s in total. Logged keys: "
          f"{sorted(k for k in trainer.callback_metrics if k.startswith('netprobe/') and k.count('/') == 1)}")
    # the directory above the run, so TensorBoard names the run (digits_mlp/version_N) instead of "."
    print(f"\nView the logs:  .venv/bin/tensorboard --logdir {args.logdir}   (this run: {os.path.relpath(logger.log_dir, args.logdir)}; "
          "the netprobe charts, a line per layer, are in the CUSTOM SCALARS tab; the runs' final and best values in HPARAMS)")


if __name__ == "__main__":
    main()
