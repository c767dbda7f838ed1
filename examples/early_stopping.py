"""Stop without a validation set: test accuracy at the epoch where reliance stops improving vs the
epoch where validation loss stops improving vs the last epoch, on the same runs.

MLPs on scikit-learn's digits with 50 % of the training labels corrupted, so that long training
memorizes the wrong labels and test accuracy falls after an early peak; several seeds (each seed:
initialization, batch order, label corruption, and the monitor's probe set and unit orders). Each
run trains for a fixed number of epochs with `RelianceMonitor` (training data, training labels) and
records, every epoch, the reliance AUC, the loss on a held-out validation split, and the test
accuracy. The stopping rules are then applied to the recorded series (the same rule as Lightning's
EarlyStopping: stop after `patience` records without improvement and keep the best epoch; reliance
additionally smoothed with an EMA as `RelianceEarlyStopping` does), so all choices are compared on
exactly the same runs.

Each seed is trained twice, once with the RelianceMonitor's default fixed unit orders (common
random numbers: the same orders every epoch) and once with fresh orders every epoch
(``orders="per_epoch"``). The monitors do not change training (the runs are bit-identical, checked),
so the two reliance series differ only in how they were measured, and the stopping rule is applied
to each, with and without EMA smoothing.

Every finding is stated on differences in test accuracy paired by seed (two rules applied to the
same run), with the mean and t-based 95 % confidence interval over seeds, and a verdict:

* "A keeps higher test accuracy than B": "yes" only when the interval lies above 0 by more than
  the stated margin, "no" only when it lies below 0 by more than the margin;
* "A is within +-delta of B" (equivalence): "yes" only when the whole interval lies inside
  (-delta, +delta), "no" only when it lies wholly outside;

and "not resolved at N seeds" otherwise: never a bare comparison of two means.

    .venv/bin/python examples/early_stopping.py [--smoke | --quick] [--seeds 16] [--seed-offset 0] [--logdir runs/early_stopping]

``--quick`` (about a minute at one thread) is large enough for the conclusions the README states;
``--smoke`` only checks that the script runs. Writes TensorBoard logs (one run per seed and orders:
``netprobe/...`` keys, ``val/loss``, ``test/acc``) under --logdir.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from _common import accuracy, corrupt_labels, digits, lightning_mlp, loader, one_thread, quiet_lightning, trainer_kwargs, t_interval, verdict
from netprobe.lightning import RelianceMonitor

ORDERS = ("fixed", "per_epoch")
#: the reliance stopping rules compared: (unit orders of the monitor, EMA smoothing, warmup epochs); the
#: first is the default of both callbacks (fixed orders: RelianceMonitor's; EMA 0.5, no warmup:
#: RelianceEarlyStopping's default); the last adds `warmup_epochs` (records of the first epochs ignored)
RULES: List[Tuple[str, float, int]] = [("fixed", 0.5, 0), ("fixed", 0.0, 0), ("per_epoch", 0.5, 0), ("per_epoch", 0.0, 0),
                                       ("fixed", 0.5, 5)]
#: margin (test accuracy) by which an interval must clear 0 before "keeps higher test accuracy" is yes/no
MARGIN = 0.02
#: equivalence bound (test accuracy): "within +-DELTA" is yes only when the whole interval lies inside it
DELTA = 0.03
#: a fixed-budget baseline: the model after this epoch (no held-out data, no signal: is the signal worth more?)
FIXED_EPOCH = 10
#: fewer seeds than this and an equivalence is not declared: rules that kept the same epoch on every
#: seed give a zero-width interval, which at two or three seeds says little about the next seed
MIN_EQUIVALENCE_SEEDS = 5


def rule_name(orders: str, smoothing: float, warmup: int = 0) -> str:
    return f"{orders}{'+EMA' if smoothing else ''}{f'+wu{warmup}' if warmup else ''}"


def equivalence(lo: float, hi: float, *, delta: float, n: int) -> str:
    """'yes' if the interval lies inside (-delta, delta) (and n >= MIN_EQUIVALENCE_SEEDS), 'no' if wholly outside it, else unresolved."""
    if math.isfinite(lo) and math.isfinite(hi):
        if -delta < lo and hi < delta and n >= MIN_EQUIVALENCE_SEEDS:
            return "yes"
        if lo >= delta or hi <= -delta:
            return "no"
    return f"not resolved at {n} seeds"


def stop_epoch(values: Sequence[float], *, mode: str, patience: int, smoothing: float = 0.0, warmup: int = 0) -> int:
    """Lightning's EarlyStopping rule on a recorded series; returns the epoch whose model is kept (the best).

    As RelianceEarlyStopping: the EMA runs over every record, but records of epochs before `warmup`
    are not compared (neither a best nor a wait).
    """
    best, best_epoch, wait, ema = None, min(warmup, len(values) - 1), 0, None
    for e, v in enumerate(values):
        ema = v if ema is None or smoothing == 0 else smoothing * ema + (1 - smoothing) * v
        if e < warmup:
            continue
        better = best is None or (ema > best if mode == "max" else ema < best)
        if better:
            best, best_epoch, wait = ema, e, 0
        else:
            wait += 1
            if wait >= patience:
                break
    return best_epoch


class Recorder(pl.Callback):
    def __init__(self, x_val, y_val, x_test, y_test):
        self.x_val, self.y_val, self.x_test, self.y_test = x_val, y_val, x_test, y_test
        self.reliance: List[float] = []
        self.val_loss: List[float] = []
        self.test_acc: List[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.reliance.append(float(trainer.callback_metrics["netprobe/reliance_auc"]))
        was = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.val_loss.append(float(nn.functional.cross_entropy(pl_module(self.x_val), self.y_val)))
        pl_module.train(was)
        self.test_acc.append(accuracy(pl_module, self.x_test, self.y_test))
        trainer.logger.log_metrics({"val/loss": self.val_loss[-1], "test/acc": self.test_acc[-1]}, step=trainer.global_step)


def run_seed(split: Dict[str, torch.Tensor], *, seed: int, epochs: int, logdir: str) -> Dict[str, List[float]]:
    """Train one seed twice (fixed and per-epoch orders); the recorded series of both runs."""
    out: Dict[str, List[float]] = {}
    for orders in ORDERS:
        pl.seed_everything(seed, verbose=False)
        y_noisy = corrupt_labels(split["y_tr"], 0.5, 10, torch.Generator().manual_seed(seed))
        rec = Recorder(split["x_val"], split["y_val"], split["x_test"], split["y_test"])
        mon = RelianceMonitor(["net.relu1", "net.relu2"], orders=orders, seed=seed)
        trainer = pl.Trainer(max_epochs=epochs, callbacks=[mon, rec],
                             logger=pl.loggers.TensorBoardLogger(logdir, name=f"seed{seed}_{orders}"), **trainer_kwargs())
        trainer.fit(lightning_mlp(64, [256, 256], 10, lr=1e-3), loader(split["x_tr"], y_noisy, batch_size=64, seed=seed))
        out[f"reliance/{orders}"] = rec.reliance
        if "test_acc" in out and (out["test_acc"] != rec.test_acc or out["val_loss"] != rec.val_loss):
            raise RuntimeError(f"seed {seed}: the run with orders={orders!r} trained differently (the monitors changed training)")
        out["test_acc"], out["val_loss"] = rec.test_acc, rec.val_loss
    return out


def stops(series: Dict[str, List[float]], *, patience: int) -> Dict[str, int]:
    """Epoch kept by each rule: the reliance rules, val-loss, a fixed epoch, the last epoch and the oracle (best test accuracy)."""
    e = {rule_name(o, sm, wu): stop_epoch(series[f"reliance/{o}"], mode="max", patience=patience, smoothing=sm, warmup=wu)
         for o, sm, wu in RULES}
    e["val-loss"] = stop_epoch(series["val_loss"], mode="min", patience=patience)
    e[f"epoch {FIXED_EPOCH}"] = min(FIXED_EPOCH, len(series["test_acc"]) - 1)
    e["last"] = len(series["test_acc"]) - 1
    e["oracle"] = int(np.argmax(series["test_acc"]))
    return e


def conclusions(acc: Dict[str, List[float]], n: int) -> List[Tuple[str, str, str, float, float, float]]:
    """(claim, verdict, detail, mean, lo, hi) for each stated finding, from per-seed test accuracies by rule."""
    out = []

    def diff(a: str, b: str) -> Tuple[float, float, float]:
        return t_interval([x - y for x, y in zip(acc[a], acc[b])])

    def higher(a: str, b: str, claim: str) -> None:
        m, lo, hi = diff(a, b)
        out.append((claim, verdict(lo, hi, margin=MARGIN, n=n), f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}], margin {MARGIN}", m, lo, hi))

    def within(a: str, b: str, claim: str) -> None:
        m, lo, hi = diff(a, b)
        out.append((claim, equivalence(lo, hi, delta=DELTA, n=n), f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}], margin {DELTA}", m, lo, hi))

    for rule in RULES:
        r = rule_name(*rule)
        higher(r, "last", f"reliance stop ({r}) keeps higher test accuracy than the last epoch")
    higher("val-loss", "last", "val-loss stop keeps higher test accuracy than the last epoch")
    for rule in RULES:
        r = rule_name(*rule)
        within(r, "val-loss", f"reliance stop ({r}) is within +-{DELTA} of val-loss stopping")
    wu = rule_name(*RULES[-1])
    higher(wu, "fixed+EMA", f"warmup ({wu}) keeps higher test accuracy than none (fixed+EMA)")
    within(wu, f"epoch {FIXED_EPOCH}", f"reliance stop ({wu}) is within +-{DELTA} of stopping at epoch {FIXED_EPOCH}")
    higher("fixed+EMA", "fixed", "EMA smoothing (fixed orders) keeps higher test accuracy than no smoothing")
    higher("per_epoch+EMA", "per_epoch", "EMA smoothing (per_epoch orders) keeps higher test accuracy than no smoothing")
    within("fixed+EMA", "per_epoch+EMA", f"fixed and per_epoch orders (both +EMA) are within +-{DELTA} of each other")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs (test suite)")
    mode.add_argument("--quick", action="store_true", help="reduced sizes that still carry the README's conclusions (~1 min)")
    ap.add_argument("--logdir", default="runs/early_stopping")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 16; --quick 8; --smoke 2)")
    ap.add_argument("--seed-offset", type=int, default=0, help="first seed")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default 40, also with --quick; --smoke 3)")
    ap.add_argument("--patience", type=int, default=5)
    args = ap.parse_args()
    print(f"early_stopping.py: {one_thread()}")
    quiet_lightning()
    if args.smoke:
        n_seeds, epochs = 2, 3
    elif args.quick:
        n_seeds, epochs = 8, 40
    else:
        n_seeds, epochs = 16, 40
    n_seeds = args.seeds if args.seeds is not None else n_seeds
    epochs = args.epochs if args.epochs is not None else epochs
    if n_seeds < 2:
        ap.error(f"Expected --seeds to be >= 2 (an interval needs two seeds), but got {n_seeds}.")
    if epochs < 1 or args.patience < 1:
        ap.error(f"Expected --epochs and --patience to be >= 1, but got {epochs} and {args.patience}.")
    seeds = [args.seed_offset + i for i in range(n_seeds)]
    data = digits(seed=0)
    n_val = len(data["x_train"]) // 5
    split = {"x_val": data["x_train"][:n_val], "y_val": data["y_train"][:n_val],
             "x_tr": data["x_train"][n_val:], "y_tr": data["y_train"][n_val:],
             "x_test": data["x_test"], "y_test": data["y_test"]}

    t0 = time.perf_counter()
    series = {s: run_seed(split, seed=s, epochs=epochs, logdir=args.logdir) for s in seeds}
    elapsed = time.perf_counter() - t0

    cols = [rule_name(*rule) for rule in RULES] + ["val-loss", f"epoch {FIXED_EPOCH}", "last", "oracle"]
    epoch_of = {s: stops(series[s], patience=args.patience) for s in seeds}
    acc = {c: [series[s]["test_acc"][epoch_of[s][c]] for s in seeds] for c in cols}

    print(f"\ndigits, 50 % of the training labels corrupted: MLP 64-256-256-10 (Adam), {len(split['x_tr'])} training images, "
          f"{epochs} epochs, seeds {seeds[0]}..{seeds[-1]}; val-loss on {n_val} held-out images; patience {args.patience}")
    print("test accuracy of the model kept by each stopping rule (its epoch in brackets); reliance with the monitor's "
          "unit orders fixed (default) or per_epoch, EMA smoothing 0.5 or none")
    print(f"{'seed':>4} | " + " | ".join(f"{c:>15}" for c in cols))
    for s in seeds:
        print(f"{s:>4} | " + " | ".join(f"{series[s]['test_acc'][epoch_of[s][c]]:.3f} [{epoch_of[s][c]:>2}]".rjust(15) for c in cols))
    print(f"mean and t-based 95% CI over {len(seeds)} seeds:")
    for c in cols:
        m, lo, hi = t_interval(acc[c])
        print(f"  {c:<15} {m:.3f} [{lo:.3f}, {hi:.3f}]")

    # how much the reliance series moves from epoch to epoch (sd of its first differences), per orders
    if epochs > 2:
        jit = {o: [float(np.std(np.diff(series[s][f"reliance/{o}"]), ddof=1)) for s in seeds] for o in ORDERS}
        cells = []
        for o in ORDERS:
            m, lo, hi = t_interval(jit[o])
            cells.append(f"{o} orders {m:.4f} [{lo:.4f}, {hi:.4f}]")
        m, lo, hi = t_interval([p - f for p, f in zip(jit["per_epoch"], jit["fixed"])])
        print("epoch-to-epoch sd of reliance_auc (first differences over the run), mean and 95% CI over seeds: "
              + ", ".join(cells) + f"; per_epoch minus fixed {m:+.4f} [{lo:+.4f}, {hi:+.4f}]  (descriptor)")

    early = {rule_name(*rule): sum(epoch_of[s][rule_name(*rule)] < 3 for s in seeds) for rule in RULES}
    print("seeds on which the reliance rule kept a model from epochs 0-2 (an underfit network scores high): "
          + ", ".join(f"{r} {k}/{len(seeds)}" for r, k in early.items()))

    print(f"\nconclusions on differences in test accuracy between rules, paired by seed (the same run): mean and t-based "
          f"95% CI over {len(seeds)} seeds. 'keeps higher' is yes/no only when the interval clears 0 by the margin; "
          f"'within +-{DELTA}' is yes only when the whole interval lies inside +-{DELTA}, no when it lies wholly outside:")
    for claim, v, detail, *_ in conclusions(acc, len(seeds)):
        print(f"  {claim}: {v}   ({detail})")
    print(f"(reliance uses no held-out data; val-loss uses {n_val} held-out examples; TensorBoard: {args.logdir}; {elapsed:.0f}s)")
    print("reliance stop done")


if __name__ == "__main__":
    main()
