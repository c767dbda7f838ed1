"""Stop without a validation set: test accuracy at the epoch where reliance stops improving vs the
epoch where validation loss stops improving vs the last epoch, on the same runs.

MLPs on scikit-learn's digits with 50 % of the training labels corrupted, so that long training
memorizes the wrong labels and test accuracy falls after an early peak; several seeds. Each run trains for a fixed number of epochs with
`RelianceMonitor` (training data, training labels) and records, every epoch, the reliance AUC, the
loss on a held-out validation split, and the test accuracy. The stopping rules are then applied to
the recorded series (the same rule as Lightning's EarlyStopping: stop after `patience` records
without improvement; reliance additionally smoothed with an EMA as `RelianceEarlyStopping` does),
so all three choices are compared on exactly the same runs.

    .venv/bin/python examples/early_stopping.py [--smoke] [--logdir runs/early_stopping]
"""

import argparse

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from _common import accuracy, corrupt_labels, digits, lightning_mlp, loader, one_thread, quiet_lightning, trainer_kwargs
from netprobe.lightning import RelianceMonitor


class Recorder(pl.Callback):
    def __init__(self, x_val, y_val, x_test, y_test):
        self.x_val, self.y_val, self.x_test, self.y_test = x_val, y_val, x_test, y_test
        self.reliance, self.val_loss, self.test_acc = [], [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.reliance.append(float(trainer.callback_metrics["netprobe/reliance_auc"]))
        was = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.val_loss.append(float(nn.functional.cross_entropy(pl_module(self.x_val), self.y_val)))
        pl_module.train(was)
        self.test_acc.append(accuracy(pl_module, self.x_test, self.y_test))
        trainer.logger.log_metrics({"val/loss": self.val_loss[-1], "test/acc": self.test_acc[-1]}, step=trainer.global_step)


def stop_epoch(values, *, mode, patience, smoothing=0.0):
    """Lightning's EarlyStopping rule on a recorded series; returns the epoch whose model is kept (the best)."""
    best, best_epoch, wait, ema = None, 0, 0, None
    for e, v in enumerate(values):
        ema = v if ema is None or smoothing == 0 else smoothing * ema + (1 - smoothing) * v
        better = best is None or (ema > best if mode == "max" else ema < best)
        if better:
            best, best_epoch, wait = ema, e, 0
        else:
            wait += 1
            if wait >= patience:
                break
    return best_epoch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--logdir", default="runs/early_stopping")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--patience", type=int, default=5)
    args = ap.parse_args()
    print(f"early_stopping.py: {one_thread()}")
    quiet_lightning()
    data = digits(seed=0)
    n_val = len(data["x_train"]) // 5
    x_val, y_val = data["x_train"][:n_val], data["y_train"][:n_val]
    x_tr, y_tr = data["x_train"][n_val:], data["y_train"][n_val:]
    seeds = range(1 if args.smoke else args.seeds)
    epochs = 2 if args.smoke else args.epochs
    rows = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        y_noisy = corrupt_labels(y_tr, 0.5, 10, torch.Generator().manual_seed(seed))
        rec = Recorder(x_val, y_val, data["x_test"], data["y_test"])
        mon = RelianceMonitor(["net.relu1", "net.relu2"], num_samples=512)
        trainer = pl.Trainer(max_epochs=epochs, callbacks=[mon, rec],
                             logger=pl.loggers.TensorBoardLogger(args.logdir, name=f"seed{seed}"), **trainer_kwargs())
        trainer.fit(lightning_mlp(64, [256, 256], 10, lr=1e-3), loader(x_tr, y_noisy, batch_size=64, seed=seed))
        e_rel = stop_epoch(rec.reliance, mode="max", patience=args.patience, smoothing=0.5)
        e_val = stop_epoch(rec.val_loss, mode="min", patience=args.patience)
        e_last = len(rec.test_acc) - 1
        e_oracle = int(np.argmax(rec.test_acc))
        rows.append((seed, e_rel, rec.test_acc[e_rel], e_val, rec.test_acc[e_val], e_last, rec.test_acc[e_last], e_oracle, rec.test_acc[e_oracle]))
    print(f"\n{'seed':>4} | {'reliance stop':>13} {'test acc':>8} | {'val-loss stop':>13} {'test acc':>8} | "
          f"{'last':>4} {'test acc':>8} | {'best (oracle)':>13} {'test acc':>8}")
    for r in rows:
        print(f"{r[0]:>4} | {r[1]:>13} {r[2]:>8.3f} | {r[3]:>13} {r[4]:>8.3f} | {r[5]:>4} {r[6]:>8.3f} | {r[7]:>13} {r[8]:>8.3f}")
    mean = lambda i: float(np.mean([r[i] for r in rows]))  # noqa: E731
    print(f"mean | {'':>13} {mean(2):>8.3f} | {'':>13} {mean(4):>8.3f} | {'':>4} {mean(6):>8.3f} | {'':>13} {mean(8):>8.3f}")
    print(f"(reliance uses no held-out data; val-loss uses {n_val} held-out examples; TensorBoard: {args.logdir})")


if __name__ == "__main__":
    main()
