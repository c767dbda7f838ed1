"""What PWCCA adds to ConvergenceMonitor on the MNIST-1D ConvNet task of ``epoch_overhead.py``
(``benchmarks/_tasks.py``; layers ``relu1``-``relu3``, conv outputs of 32, 64, 64 channels x 40
positions, so PWCCA takes position-sampled rows), and how precise the position-sampled value is.

    .venv/bin/python benchmarks/convergence_cost.py [--rounds 5] [--epochs 4] [--batches 10] [--seeds 5]

It prints:

* the per-measurement time (the monitor's ``netprobe/time/ConvergenceMonitor`` key, median over the
  measurements that have a previous one to compare with, i.e. all but the first epoch's) of
  ``ConvergenceMonitor(methods=("cka",))`` and of ``methods=("pwcca", "cka")``, each alone on the
  Trainer, run side by side: the two alternate within each of ``--rounds`` rounds (the first of
  the pair alternating too), and the ratio pwcca+cka / cka is printed per round, with its median
  and spread (min-max);
* the precision of ``pwcca_prev`` under position sampling: one network trajectory (the same
  training run, bit for bit: the monitor never touches the training RNG) measured with ``--seeds``
  monitor seeds on a fixed probe set (the first 256 training examples), so only the sampled
  positions differ; per layer and for the mean, the mean over seeds, the standard deviation, and
  ``1 - mean`` (the signal: how far from unchanged) beside it. ``cka_prev`` (no sampling) is
  printed as a check that the trajectories agree.

One torch thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)). On a shared, noisy machine only
the side-by-side ratios mean something; the absolute milliseconds vary from run to run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from typing import Dict, List, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tasks import task  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from _common import quiet_lightning  # noqa: E402

from netprobe.lightning import ConvergenceMonitor  # noqa: E402

TIME_KEY = "netprobe/time/ConvergenceMonitor"
VARIANTS = {"cka": ("cka",), "pwcca+cka": ("pwcca", "cka")}


class Record(pl.Callback):
    """The monitor's values at the end of each epoch (placed after the monitor)."""

    def __init__(self, mon: ConvergenceMonitor) -> None:
        self.mon = mon
        self.epochs: List[Dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append(dict(self.mon.last_values))


def fit(cls: type, loader, mon: ConvergenceMonitor, epochs: int, batches: int) -> Record:
    pl.seed_everything(0, verbose=False)
    loader.generator.manual_seed(0)  # the same shuffles in every run: one training trajectory
    rec = Record(mon)
    tr = pl.Trainer(max_epochs=epochs, callbacks=[mon, rec], logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                    limit_train_batches=batches, deterministic=True)
    tr.fit(cls(), loader)
    return rec


def spread(xs: Sequence[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(min(xs))}-{fmt.format(max(xs))}"


def cost(cls: type, loader, layers: List[str], rounds: int, epochs: int, batches: int) -> None:
    ms: Dict[str, List[float]] = {v: [] for v in VARIANTS}
    ratios: List[float] = []
    for r in range(rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
        for v in order:
            rec = fit(cls, loader, ConvergenceMonitor(layers, methods=VARIANTS[v]), epochs, batches)
            ms[v].append(1e3 * statistics.median(e[TIME_KEY] for e in rec.epochs[1:]))
        ratios.append(ms["pwcca+cka"][-1] / ms["cka"][-1])
        print(f"  round {r + 1}: cka {ms['cka'][-1]:7.1f} ms   pwcca+cka {ms['pwcca+cka'][-1]:7.1f} ms   "
              f"ratio {ratios[-1]:.2f}", flush=True)
    print(f"per measurement, median of rounds: cka {statistics.median(ms['cka']):.1f} ms "
          f"({spread(ms['cka'], '{:.1f}')}), pwcca+cka {statistics.median(ms['pwcca+cka']):.1f} ms "
          f"({spread(ms['pwcca+cka'], '{:.1f}')})")
    print(f"ratio pwcca+cka / cka: median {statistics.median(ratios):.2f} (rounds {spread(ratios)}, {rounds} rounds)")


def precision(cls: type, loader, layers: List[str], data: Dict[str, torch.Tensor], seeds: int, batches: int) -> None:
    probe = (data["x_train"][:256], data["y_train"][:256])
    runs = []
    for s in range(seeds):
        mon = ConvergenceMonitor(layers, methods=("pwcca", "cka"), probe_data=probe, seed=s)
        runs.append(fit(cls, loader, mon, 2, batches).epochs[1])
    print(f"pwcca_prev at epoch 1 vs 0, {seeds} seeds of position sampling, one network trajectory, n=256, "
          f"k={mon.state_dict()['extra']['pwcca_rows']['positions']} positions per input:")
    print(f"  {'layer':8s} {'mean':>10s} {'sd':>10s} {'1 - mean':>10s} {'sd/(1-mean)':>12s} {'cka_prev range':>16s}")
    for name in [*layers, None]:
        key = "netprobe/pwcca_prev" + (f"/{name}" if name else "")
        vals = [run[key] for run in runs]
        ckas = [run["netprobe/cka_prev" + (f"/{name}" if name else "")] for run in runs]
        m, sd = statistics.mean(vals), statistics.stdev(vals)
        print(f"  {name or 'mean':8s} {m:10.6f} {sd:10.2e} {1 - m:10.2e} {sd / (1 - m):12.3f} {max(ckas) - min(ckas):16.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run (all but the first measurement timed)")
    ap.add_argument("--batches", type=int, default=10, help="training batches per epoch (the measurement does not depend on it)")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    quiet_lightning()
    cls, loader, layers, data = task("convnet")
    print(f"MNIST-1D ConvNet, layers {layers}, default probe set (256), torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread; a shared machine: compare the ratios, not the ms")
    cost(cls, loader, layers, args.rounds, args.epochs, args.batches)
    precision(cls, loader, layers, data, args.seeds, args.batches)


if __name__ == "__main__":
    main()
