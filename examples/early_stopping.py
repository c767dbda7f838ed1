"""Stop without a validation set: test accuracy at the epoch where reliance stops improving vs the
epoch where validation loss stops improving vs the last epoch, on the same runs.

MLPs on scikit-learn's digits with 50 % of the training labels corrupted, so that long training
memorizes the wrong labels and test accuracy falls after an early peak; several seeds. Each run trains for a fixed number of epochs with
`RelianceMonitor` (training data, training labels) and records, every epoch, the reliance AUC, the
loss on a held-out validation split, and the test accuracy. The stopping rules are then applied to
the recorded series (the same rule as Lightning's EarlyStopping: stop after `patience` records
without improvement; reliance additionally smoothed with an EMA as `RelianceEarlyStopping` does),
so all three choices are compared on exactly the same runs.

Each seed is trained twice, once with the RelianceMonitor's default fixed unit orders (common
random numbers: the same orders every epoch) and once with fresh orders every epoch
(``orders="per_epoch"``). The monitors do not change training (the runs are bit-identical), so
the two reliance series differ only in how they were measured, and the stopping rule is applied to
each, with and without EMA smoothing.

    .venv/bin/python examples/early_stopping.py [--smoke] [--seeds 6] [--logdir runs/early_stopping]
"""

import argparse
import math

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


def _mean_ci(values):
    """Mean and a 90 % t-interval half-width over seeds."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.95, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--logdir", default="runs/early_stopping")
    ap.add_argument("--seeds", type=int, default=6)
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
    rules = [("fixed", 0.0), ("fixed", 0.5), ("per_epoch", 0.0), ("per_epoch", 0.5)]
    rows, jitter = [], {"fixed": [], "per_epoch": []}
    for seed in seeds:
        recs = {}
        for orders in ("fixed", "per_epoch"):
            pl.seed_everything(seed, verbose=False)
            y_noisy = corrupt_labels(y_tr, 0.5, 10, torch.Generator().manual_seed(seed))
            rec = Recorder(x_val, y_val, data["x_test"], data["y_test"])
            mon = RelianceMonitor(["net.relu1", "net.relu2"], orders=orders)
            trainer = pl.Trainer(max_epochs=epochs, callbacks=[mon, rec],
                                 logger=pl.loggers.TensorBoardLogger(args.logdir, name=f"seed{seed}_{orders}"), **trainer_kwargs())
            trainer.fit(lightning_mlp(64, [256, 256], 10, lr=1e-3), loader(x_tr, y_noisy, batch_size=64, seed=seed))
            recs[orders] = rec
            # how much the series moves from epoch to epoch (sd of the first differences)
            if len(rec.reliance) > 2:
                jitter[orders].append(float(np.std(np.diff(rec.reliance))))
        rec = recs["fixed"]
        assert recs["per_epoch"].test_acc == rec.test_acc, "the monitors changed training"
        e_val = stop_epoch(rec.val_loss, mode="min", patience=args.patience)
        e_last = len(rec.test_acc) - 1
        e_oracle = int(np.argmax(rec.test_acc))
        stops = [stop_epoch(recs[o].reliance, mode="max", patience=args.patience, smoothing=sm) for o, sm in rules]
        rows.append((seed, stops, [rec.test_acc[e] for e in stops], e_val, rec.test_acc[e_val], e_last, rec.test_acc[e_last],
                     e_oracle, rec.test_acc[e_oracle]))
    names = [f"{o}{'+EMA' if sm else ''}" for o, sm in rules]
    print(f"\ntest accuracy of the model kept by each stopping rule (stop epoch in brackets); reliance orders "
          f"fixed (default) or per_epoch, EMA smoothing 0.5 or none; patience {args.patience}")
    print(f"{'seed':>4} | " + " | ".join(f"{n:>16}" for n in names) + f" | {'val-loss':>12} | {'last':>12} | {'oracle':>12}")
    for r in rows:
        cells = [f"{a:.3f} [{e:>2}]" for e, a in zip(r[1], r[2])]
        print(f"{r[0]:>4} | " + " | ".join(f"{c:>16}" for c in cells)
              + f" | {r[4]:.3f} [{r[3]:>2}] | {r[6]:.3f} [{r[5]:>2}] | {r[8]:.3f} [{r[7]:>2}]")
    cols = [[r[2][i] for r in rows] for i in range(len(rules))] + [[r[4] for r in rows], [r[6] for r in rows], [r[8] for r in rows]]
    cis = [_mean_ci(c) for c in cols]
    print(f"{'mean':>4} | " + " | ".join(f"{m:.3f} +- {h:.3f}".rjust(16) for m, h in cis[:4])
          + " | " + " | ".join(f"{m:.3f}+-{h:.3f}".rjust(12) for m, h in cis[4:]))
    print("(+- : 90 % t-interval over seeds)")
    if all(jitter.values()) and len(jitter["fixed"]) == len(jitter["per_epoch"]):
        jf, jp = _mean_ci(jitter["fixed"]), _mean_ci(jitter["per_epoch"])
        print(f"epoch-to-epoch sd of reliance_auc (first differences over the run): fixed orders {jf[0]:.4f} +- {jf[1]:.4f}, "
              f"per_epoch {jp[0]:.4f} +- {jp[1]:.4f}")
    gap = [r[2][0] - r[4] for r in rows]
    m, h = _mean_ci(gap)
    print(f"reliance stop (fixed, no EMA) minus val-loss stop, test accuracy: {m:+.3f} +- {h:.3f}; "
          f"minus last epoch: {_mean_ci([r[2][0] - r[6] for r in rows])[0]:+.3f}")
    print(f"(reliance uses no held-out data; val-loss uses {n_val} held-out examples; TensorBoard: {args.logdir})")
    print("reliance stop done")


if __name__ == "__main__":
    main()
