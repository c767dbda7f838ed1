"""Epoch time with all three monitors (defaults, every epoch) vs none, on the demo task
(the MLP of examples/demo.py on scikit-learn's digits), side by side in one run.

    .venv/bin/python benchmarks/epoch_overhead.py [--epochs 6] [--every 1]

Target on this CPU: ratio <= 1.25 with defaults. Prints each monitor's share (from the
`netprobe/time/<Monitor>` keys) and the ratio with `every_n_epochs=--every`. One torch thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from _common import quiet_lightning  # noqa: E402
from demo import MLP  # noqa: E402

from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor  # noqa: E402


class EpochTimer(pl.Callback):
    def __init__(self):
        self.times, self.shares = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self.t0)
        self.shares.append({k.split("/")[-1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("netprobe/time/")})


def run(data, monitors, epochs):
    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    tr = pl.Trainer(max_epochs=epochs, callbacks=[*monitors, timer], logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    tr.fit(MLP(), data)
    return timer


def reliance_floor(model, x, reps=20):
    """Seconds of the arithmetic the default RelianceMonitor cannot avoid on this MLP, in plain
    torch: for each monitored layer, the layers after it on every distinct ablation mask (11
    fractions x 3 random orders = 29 distinct masks; fraction 0 and 1 are shared) x the probe set.
    No netprobe code, no hooks, no loss, no accuracy; the masking itself is not timed either."""
    model.eval()
    with torch.no_grad():
        h1 = model.relu1(model.fc1(x)).repeat(29, 1)
        h2 = model.relu2(model.fc2(h1[: len(x)])).repeat(29, 1)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model.out(model.relu2(model.fc2(h1)))
            model.out(h2)
            ts.append(time.perf_counter() - t0)
    return min(ts)  # a floor: the best of the repetitions


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=11)
    ap.add_argument("--every", type=int, default=5, help="every_n_epochs for the cheaper setting")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    quiet_lightning()
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:1200], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[:1200])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    layers = ["relu1", "relu2"]
    print(f"epoch overhead on the demo task (MLP 64-128-128-10, 1200 digits, batch 64): torch {torch.__version__}, "
          f"torch threads = {torch.get_num_threads()}, device cpu")
    base, full, cheap, shares = [], [], [], []
    for _ in range(args.rounds):  # alternate the variants so machine drift hits all of them
        b = run(data, [], args.epochs)
        f = run(data, [SelectivityMonitor(layers), RelianceMonitor(layers), ConvergenceMonitor(layers)], args.epochs)
        c = run(data, [SelectivityMonitor(layers, every_n_epochs=args.every), RelianceMonitor(layers, every_n_epochs=args.every),
                       ConvergenceMonitor(layers, every_n_epochs=args.every)], args.epochs)
        base += b.times[1:]
        full += f.times[1:]
        cheap += c.times[1:]
        shares += f.shares[1:]
    tb, tf = statistics.median(base), statistics.median(full)
    tc = statistics.mean(cheap) / statistics.mean(base) * tb  # amortized: the measuring epoch averaged in
    print(f"median epoch: no monitors {tb * 1e3:.1f} ms | all three, every epoch {tf * 1e3:.1f} ms | "
          f"every {args.every} epochs {tc * 1e3:.1f} ms")
    print(f"ratio (defaults, every epoch): {tf / tb:.2f}   target <= 1.25")
    print(f"ratio (every_n_epochs={args.every}, averaged over epochs): {tc / tb:.2f}")
    for name in sorted({k for s in shares for k in s}):
        t = statistics.median(s.get(name, 0.0) for s in shares)
        print(f"  {name:<20} {t * 1e3:7.1f} ms/epoch  = {t / tb * 100:5.1f} % of a bare epoch")
    g = torch.Generator().manual_seed(0)
    floor = reliance_floor(MLP(), x[torch.randperm(len(x), generator=g)[:512]])
    print(f"floor: the forward passes the default reliance curves need (layers after relu1/relu2 on 29 masks x 512 "
          f"probe examples, plain torch) take {floor * 1e3:.1f} ms = {floor / tb * 100:.0f} % of a bare epoch, so no "
          f"implementation of the defaults gets below a ratio of {1 + floor / tb:.2f} with RelianceMonitor alone")


if __name__ == "__main__":
    main()
