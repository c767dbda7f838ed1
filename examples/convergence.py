"""Bottom-up convergence (Raghu et al. 2017; Morcos et al. 2018): lower layers' representations stop
changing (similarity to the previous epoch near 1) before upper layers'.

An MLP with four hidden layers on MNIST-1D (generated locally) with ConvergenceMonitor; prints
pwcca_prev and cka_prev per layer and epoch, and for each layer the first epoch from which
pwcca_prev stays above a threshold.

    .venv/bin/python examples/convergence.py [--smoke] [--logdir runs/convergence]
"""

import argparse

import pytorch_lightning as pl
import torch

from _common import lightning_mlp, loader, mnist1d, one_thread, quiet_lightning, trainer_kwargs
from netprobe.lightning import ConvergenceMonitor


class Recorder(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if "_prev/" in k})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--logdir", default="runs/convergence")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threshold", type=float, default=0.98)
    args = ap.parse_args()
    print(f"convergence.py: {one_thread()}")
    quiet_lightning()
    pl.seed_everything(0, verbose=False)
    data = mnist1d(seed=0, num_samples=1000 if args.smoke else 5000)
    layers = [f"net.relu{i}" for i in range(1, 5)]
    rec = Recorder()
    mon = ConvergenceMonitor(layers, num_samples=250 if args.smoke else 1000, methods=("pwcca", "cka"), heatmap=True)
    trainer = pl.Trainer(max_epochs=2 if args.smoke else args.epochs, callbacks=[mon, rec],
                         logger=pl.loggers.TensorBoardLogger(args.logdir, name="mlp4"), **trainer_kwargs())
    model = lightning_mlp(40, [100, 100, 100, 100], 10, lr=1e-3)
    trainer.fit(model, loader(data["x_train"], data["y_train"], batch_size=100))
    short = [l.split(".")[-1] for l in layers]
    print(f"\n{'epoch':>5} " + " ".join(f"{'pwcca ' + s:>12}" for s in short) + " " + " ".join(f"{'cka ' + s:>10}" for s in short))
    for epoch, row in enumerate(rec.rows):
        if not row:
            continue
        print(f"{epoch:>5} " + " ".join(f"{row.get(f'netprobe/pwcca_prev/{l}', float('nan')):>12.4f}" for l in layers)
              + " " + " ".join(f"{row.get(f'netprobe/cka_prev/{l}', float('nan')):>10.4f}" for l in layers))
    firsts = {}
    for l in layers:
        series = [r.get(f"netprobe/pwcca_prev/{l}") for r in rec.rows]
        first = None
        for e in range(len(series)):
            if all(v is not None and v >= args.threshold for v in series[e:]):
                first = e
                break
        firsts[l] = first
    print(f"\nfirst epoch from which pwcca_prev stays >= {args.threshold}: "
          + ", ".join(f"{l.split('.')[-1]}: {firsts[l]}" for l in layers))
    order = [firsts[l] if firsts[l] is not None else 10**9 for l in layers]
    print(f"bottom-up (each layer converges no later than the one above it): {order == sorted(order)}")
    x = data["x_test"][:500]
    with torch.no_grad():
        acc = (model(x).argmax(1) == data["y_test"][:500]).float().mean().item()
    print(f"test accuracy {acc:.3f}; TensorBoard: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
