"""Bottom-up convergence (Raghu et al. 2017; Morcos et al. 2018): lower layers' representations settle
(similarity to the previous epoch near 1) sooner than upper layers'.

MLPs with four hidden layers on MNIST-1D (generated locally), trained with Lightning and a
ConvergenceMonitor, over several seeds (initialization, batch order and the monitor's probe set).
Each epoch the monitor logs ``pwcca_prev`` and ``cka_prev`` per layer: the similarity of the layer's
representation of the probe set to the one at the previous epoch. For each seed and layer we
summarize the whole run by the **distance travelled per epoch**: the mean over epochs 1..E-1 of
``1 - pwcca_prev`` (and of ``1 - cka_prev``). A layer that settles early travels little.

The finding is stated for each pair of adjacent layers as the difference (upper minus lower layer)
of that distance, paired by seed, with its mean and t-based 95 % confidence interval over seeds.
A verdict is "yes" only when the interval lies above 0 by more than the stated margin, "no" only
when it lies below 0 by more than the margin, and "not resolved at N seeds" otherwise. (An earlier
version printed the first epoch from which ``pwcca_prev`` stays above 0.98: a threshold crossing
that came out at epoch 29 on one machine and never on another.)

    .venv/bin/python examples/convergence.py [--smoke | --quick] [--seeds 6] [--seed-offset 0] [--logdir runs/convergence]

``--quick`` (about a minute at one thread) is large enough for the conclusions the README states;
``--smoke`` only checks that the script runs.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Dict, List, Tuple

import numpy as np
import pytorch_lightning as pl
import torch

from _common import lightning_mlp, loader, mnist1d, one_thread, quiet_lightning, trainer_kwargs, t_interval, verdict
from netprobe.lightning import ConvergenceMonitor

LAYERS = [f"net.relu{i}" for i in range(1, 5)]
SHORT = [l.split(".")[-1] for l in LAYERS]
METHODS = ("pwcca", "cka")
#: margins (in units of 1 - similarity per epoch) by which an interval must clear 0 for a verdict
MARGIN = {"pwcca": 0.001, "cka": 0.0005}


class Recorder(pl.Callback):
    """Keeps the ``*_prev`` values logged at each epoch (epoch 0 has none: there is no previous epoch)."""

    def __init__(self) -> None:
        self.rows: List[Dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if "_prev/" in k})


def run_one(data, *, seed: int, epochs: int, num_samples: int, logdir: str, heatmap: bool) -> Tuple[List[Dict[str, float]], float]:
    pl.seed_everything(seed, verbose=False)
    rec = Recorder()
    mon = ConvergenceMonitor(LAYERS, num_samples=num_samples, methods=METHODS, heatmap=heatmap, seed=seed)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[mon, rec],
                         logger=pl.loggers.TensorBoardLogger(logdir, name=f"mlp4_seed{seed}"), **trainer_kwargs())
    model = lightning_mlp(40, [100, 100, 100, 100], 10, lr=1e-3)
    trainer.fit(model, loader(data["x_train"], data["y_train"], batch_size=100, seed=seed))
    model.eval()
    with torch.no_grad():
        acc = (model(data["x_test"]).argmax(1) == data["y_test"]).double().mean().item()
    return rec.rows, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs (test suite)")
    mode.add_argument("--quick", action="store_true", help="reduced sizes that still carry the README's conclusions (~1 min)")
    ap.add_argument("--logdir", default="runs/convergence")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 6; --quick 4; --smoke 2)")
    ap.add_argument("--seed-offset", type=int, default=0, help="first seed")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30; --quick 10; --smoke 3)")
    args = ap.parse_args()
    print(f"convergence.py: {one_thread()}")
    quiet_lightning()
    if args.smoke:
        n_seeds, epochs, n_data, num_samples = 2, 3, 1000, 250
    elif args.quick:
        n_seeds, epochs, n_data, num_samples = 4, 10, 2500, 500
    else:
        n_seeds, epochs, n_data, num_samples = 6, 30, 5000, 1000
    n_seeds = args.seeds if args.seeds is not None else n_seeds
    epochs = args.epochs if args.epochs is not None else epochs
    if n_seeds < 2:
        ap.error(f"Expected --seeds to be >= 2 (an interval needs two seeds), but got {n_seeds}.")
    if epochs < 2:
        ap.error(f"Expected --epochs to be >= 2 (similarity to the previous epoch needs two), but got {epochs}.")
    seeds = [args.seed_offset + i for i in range(n_seeds)]
    data = mnist1d(seed=0, num_samples=n_data)

    t0 = time.perf_counter()
    series: Dict[int, List[Dict[str, float]]] = {}
    test_acc: Dict[int, float] = {}
    for i, seed in enumerate(seeds):
        series[seed], test_acc[seed] = run_one(data, seed=seed, epochs=epochs, num_samples=num_samples, logdir=args.logdir,
                                               heatmap=i == 0)
    elapsed = time.perf_counter() - t0

    print(f"\nMNIST-1D: MLP 40-100-100-100-100-10 (Adam), {len(data['x_train'])} training signals, {epochs} epochs, "
          f"seeds {seeds[0]}..{seeds[-1]}; ConvergenceMonitor on {num_samples} training signals")
    print(f"similarity to the previous epoch, mean over {len(seeds)} seeds")
    print(f"{'epoch':>5} " + " ".join(f"{'pwcca ' + s:>12}" for s in SHORT) + " " + " ".join(f"{'cka ' + s:>10}" for s in SHORT))
    for epoch in range(1, epochs):
        vals = {(m, l): np.mean([series[s][epoch].get(f"netprobe/{m}_prev/{l}", float("nan")) for s in seeds])
                for m in METHODS for l in LAYERS}
        print(f"{epoch:>5} " + " ".join(f"{vals[('pwcca', l)]:>12.4f}" for l in LAYERS)
              + " " + " ".join(f"{vals[('cka', l)]:>10.4f}" for l in LAYERS))

    # distance travelled per epoch: mean over epochs 1..E-1 of 1 - similarity, per seed and layer
    dist: Dict[Tuple[str, int, str], float] = {}
    for m in METHODS:
        for s in seeds:
            for l in LAYERS:
                v = [row[f"netprobe/{m}_prev/{l}"] for row in series[s][1:] if f"netprobe/{m}_prev/{l}" in row]
                if len(v) != epochs - 1 or not all(math.isfinite(x) for x in v):
                    raise RuntimeError(f"{m}_prev/{l} was not logged at every epoch 1..{epochs - 1} of seed {s}: {v}")
                dist[(m, s, l)] = float(np.mean([1.0 - x for x in v]))

    print(f"\ndistance travelled per epoch (mean over epochs 1..{epochs - 1} of 1 - similarity to the previous epoch)")
    print(f"{'seed':>5} " + " ".join(f"{'pwcca ' + s:>12}" for s in SHORT) + " " + " ".join(f"{'cka ' + s:>10}" for s in SHORT)
          + f" {'test acc':>8}")
    for s in seeds:
        print(f"{s:>5} " + " ".join(f"{dist[('pwcca', s, l)]:>12.5f}" for l in LAYERS) + " "
              + " ".join(f"{dist[('cka', s, l)]:>10.5f}" for l in LAYERS) + f" {test_acc[s]:>8.3f}")
    for m in METHODS:
        cells = []
        for l in LAYERS:
            mean, lo, hi = t_interval([dist[(m, s, l)] for s in seeds])
            cells.append(f"{l.split('.')[-1]} {mean:.5f} [{lo:.5f}, {hi:.5f}]")
        print(f"  {m:<5} mean and t-based 95% CI over seeds: " + ", ".join(cells))
    mean, lo, hi = t_interval([test_acc[s] for s in seeds])
    print(f"  test accuracy: {mean:.3f} [{lo:.3f}, {hi:.3f}]")

    print("\nupper minus lower layer, paired by seed: mean and t-based 95% CI of the difference in distance per epoch")
    conclusions: List[Tuple[str, str, str]] = []
    overall: Dict[str, List[str]] = {m: [] for m in METHODS}
    for m in METHODS:
        for lower, upper in zip(LAYERS[:-1], LAYERS[1:]):
            mean, lo, hi = t_interval([dist[(m, s, upper)] - dist[(m, s, lower)] for s in seeds])
            lo_s, up_s = lower.split(".")[-1], upper.split(".")[-1]
            print(f"  {m:<5} {up_s} - {lo_s}: {mean:+.5f} [{lo:+.5f}, {hi:+.5f}]")
            v = verdict(lo, hi, margin=MARGIN[m], n=len(seeds))
            overall[m].append(v)
            conclusions.append((f"{up_s} travels farther per epoch than {lo_s} ({m})", v,
                                f"{mean:+.5f} [{lo:+.5f}, {hi:+.5f}], margin {MARGIN[m]}"))

    print(f"\nconclusions (yes/no only when the 95% interval clears 0 by the margin; {len(seeds)} seeds):")
    for claim, v, detail in conclusions:
        print(f"  {claim}: {v}   ({detail})")
    for m in METHODS:
        vs = overall[m]
        v = "yes" if all(x == "yes" for x in vs) else "no" if any(x == "no" for x in vs) else f"not resolved at {len(seeds)} seeds"
        print(f"  bottom-up by {m} (each layer travels less per epoch than the one above it): {v}")
    print("  (Raghu et al. 2017; Morcos et al. 2018: lower layers converge first)")
    print(f"TensorBoard: tensorboard --logdir {args.logdir}   ({elapsed:.0f}s)")


if __name__ == "__main__":
    main()
