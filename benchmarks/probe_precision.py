"""Precision and cost of SelectivityMonitor's and ConvergenceMonitor's values against the size of
the probe set: sd over probe sets (random subsets of the training set) of `selectivity_mean`,
`dead_fraction` and `cka_prev` (linear CKA of each layer between two consecutive checkpoints, the
same probe set at both), and the change of each between the checkpoints (the signal), on the demo
MLP (digits) and the MNIST-1D ConvNet of benchmarks/_tasks.py. One torch thread.

    .venv/bin/python benchmarks/probe_precision.py [--sets 24]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tasks import task  # noqa: E402

import netprobe  # noqa: E402
from netprobe.metrics import class_selectivity, linear_cka  # noqa: E402


def train(model: nn.Module, loader, epochs: int):
    opt = model.configure_optimizers()
    snaps = []
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        snaps.append(copy.deepcopy(model).eval())
    return snaps


def acts(model: nn.Module, layers, x):
    with torch.no_grad(), netprobe.probe(model, layers, capacity=len(x)) as p:
        model(x)
    return {n: p[n] for n in layers}


def values(prev: nn.Module, cur: nn.Module, layers, x, y):
    a, b = acts(cur, layers, x), acts(prev, layers, x)
    sel = [class_selectivity(a[n], y, num_classes=10) for n in layers]
    return {
        "selectivity_mean": sum(float(s.mean) for s in sel) / len(sel),
        "dead_fraction": sum(s.num_dead / s.num_units for s in sel) / len(sel),
        "cka_prev": sum(float(linear_cka(a[n], b[n])) for n in layers) / len(layers),
    }


def sd_ci(v):
    """sd and a 90 % chi-square interval."""
    from scipy import stats

    n = len(v)
    m = sum(v) / n
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    lo, hi = (math.sqrt((n - 1) / stats.chi2.ppf(q, n - 1)) for q in (0.95, 0.05))
    return m, s, s * lo, s * hi


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=24)
    ap.add_argument("--tasks", default="demo,convnet")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"probe_precision: torch {torch.__version__}, torch threads = {torch.get_num_threads()} (1 on purpose); "
          f"{args.sets} probe sets per size")
    for name in args.tasks.split(","):
        torch.manual_seed(0)
        cls, loader, layers, d = task(name)
        epochs = 15 if name == "demo" else 8
        prev, cur = train(cls(), loader, epochs)[-2:]
        x_all, y_all = d["x_train"], d["y_train"]
        print(f"\n== {name}: layers {layers}, {epochs} epochs; values at the last checkpoint, cka_prev against the one before")
        print(f"{'n':>5} {'metric':>17} {'mean':>8} {'sd over sets (90% CI)':>26} {'ms':>7}")
        for n in (128, 256, 512):
            rows = []
            g = torch.Generator().manual_seed(1)
            for _ in range(args.sets):
                idx = torch.randperm(len(x_all), generator=g)[:n]
                rows.append(values(prev, cur, layers, x_all[idx], y_all[idx]))
            idx = torch.randperm(len(x_all), generator=g)[:n]
            t = []
            for _ in range(5):
                t0 = time.perf_counter()
                values(prev, cur, layers, x_all[idx], y_all[idx])
                t.append(time.perf_counter() - t0)
            for k in rows[0]:
                m, s, lo, hi = sd_ci([r[k] for r in rows])
                print(f"{n:>5} {k:>17} {m:>8.4f} {s:>10.4f} ({lo:.4f}-{hi:.4f}) {min(t) * 1e3:>7.1f}")
        # the signal: the change between the two checkpoints, on a 512-example probe set
        idx = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(2))[:512]
        a = values(prev, cur, layers, x_all[idx], y_all[idx])
        b = values(prev, prev, layers, x_all[idx], y_all[idx])
        print(f"  change between the two checkpoints (512 examples): selectivity_mean {a['selectivity_mean'] - b['selectivity_mean']:+.4f}, "
              f"dead_fraction {a['dead_fraction'] - b['dead_fraction']:+.4f}; 1 - cka_prev = {1 - a['cka_prev']:.4f}")


if __name__ == "__main__":
    main()
