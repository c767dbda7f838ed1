"""Memorizing networks rely more on single directions (Morcos et al. 2018, Fig. 1-2).

MLPs are trained to 100 % training accuracy on scikit-learn's digits with 0 %, 50 % and 100 % of
the training labels replaced by random ones, over several seeds. The corrupted labels are drawn
once per corruption level (from ``--seed-offset``) and shared by all seeds at that level, so the
networks of one level fit the same labels and differ only in initialization and batch order. For
each run we measure, on the TRAINING inputs with the labels the network was trained on:

* reliance AUC per hidden layer: area under the cumulative zero-ablation curve (random unit order,
  3 orders), normalized by the unablated accuracy (1.0 = ablation does not hurt);
* mean class selectivity per hidden layer;
* PWCCA between the last hidden layers of two networks at the same corruption level;

and test accuracy on the true test labels. The papers' findings: reliance AUC and PWCCA between
networks fall as corruption rises, and AUC tracks test accuracy.

Every finding is stated with an interval over seeds and a verdict:

* differences between corruption levels are paired by seed (the same initialization and batch
  order at both levels): mean and t-based 95 % confidence interval of the per-seed difference;
* PWCCA is compared over disjoint pairs of seeds ((s0, s1), (s2, s3), ...: independent values),
  paired by seed pair across levels, with the same t-based 95 % interval;
* Spearman's rho between reliance AUC and test accuracy over all runs, with a 95 % percentile
  bootstrap interval (runs resampled with replacement within each corruption level, 2000 times).

A verdict is "yes" only when the interval lies above the threshold (0) by more than the stated
margin, "no" only when it lies below it by more than the margin, and "not resolved at N seeds"
otherwise: never a bare comparison of two means.

    .venv/bin/python examples/memorization.py [--smoke | --quick] [--seeds 10] [--seed-offset 0] [--logdir runs/memorization]

``--quick`` (about a minute at one thread) is large enough for the conclusions the README states;
``--smoke`` only checks that the script runs. Writes TensorBoard logs (one run per network,
``netprobe/...`` keys + hparams) under --logdir.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from _common import accuracy, corrupt_labels, digits, mlp, one_thread, train, t_interval, verdict
from netprobe import probe
from netprobe.metrics import ablation_curve, class_selectivity, pwcca

LAYERS = ["relu1", "relu2"]
LEVELS = [0.0, 0.5, 1.0]
#: margins by which an interval must clear 0 before a verdict is "yes" or "no"
AUC_MARGIN = 0.05  # normalized reliance AUC units
PWCCA_MARGIN = 0.02  # PWCCA similarity units
RHO_MARGIN = 0.3  # Spearman rho
BOOTSTRAP = 2000
#: fewer runs per level than this and a percentile bootstrap interval is too narrow to trust: no verdict
MIN_BOOTSTRAP_SEEDS = 5


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])  # average ranks for ties (bootstrap resamples repeat runs)


def bootstrap_rho(groups: List[List[Tuple[float, float]]], *, seed: int, n_boot: int = BOOTSTRAP) -> Tuple[float, float]:
    """95 % percentile interval of Spearman's rho over (auc, test_acc) pairs, resampled within groups."""
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(n_boot):
        sample = [g[i] for g in groups for i in rng.integers(0, len(g), len(g))]
        a, b = zip(*sample)
        if len(set(a)) > 1 and len(set(b)) > 1:
            rhos.append(spearman(a, b))
    lo, hi = np.percentile(rhos, [2.5, 97.5])
    return float(lo), float(hi)


def run_one(x, y, x_test, y_test, *, seed: int, width: int, max_epochs: int) -> Tuple[Dict[str, float], torch.Tensor]:
    torch.manual_seed(seed)
    model = mlp(64, [width, width], 10)
    epochs = train(model, x, y, epochs=max_epochs, lr=1e-3, batch_size=128,
                   generator=torch.Generator().manual_seed(seed), stop_at_train_acc=1.0)
    rec: Dict[str, float] = {"seed": seed, "epochs": epochs, "train_acc": accuracy(model, x, y),
                             "test_acc": accuracy(model, x_test, y_test)}
    for layer in LAYERS:
        curve = ablation_curve(model, layer, (x, y), repeats=3, generator=torch.Generator().manual_seed(seed))
        rec[f"auc/{layer}"] = float(curve.auc)
    with probe(model, LAYERS, capacity=len(x)) as p:
        model.eval()
        with torch.no_grad():
            model(x)
    for layer in LAYERS:
        rec[f"sel/{layer}"] = float(class_selectivity(p[layer], y, num_classes=10).mean)
    rec["auc"] = float(np.mean([rec[f"auc/{l}"] for l in LAYERS]))
    rec["sel"] = float(np.mean([rec[f"sel/{l}"] for l in LAYERS]))
    return rec, p[LAYERS[-1]]


def main() -> None:
    ap = argparse.ArgumentParser(description="Memorization vs reliance on single directions")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs (test suite)")
    mode.add_argument("--quick", action="store_true", help="reduced sizes that still carry the README's conclusions (~1 min)")
    ap.add_argument("--logdir", default="runs/memorization")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per corruption level (default 10; --quick 6; --smoke 2)")
    ap.add_argument("--seed-offset", type=int, default=0, help="first seed; also seeds the label corruption")
    args = ap.parse_args()
    print(f"memorization.py: {one_thread()}")
    if args.smoke:
        n_seeds, width, max_epochs, n_train = 2, 32, 10, 300
    elif args.quick:
        n_seeds, width, max_epochs, n_train = 6, 128, 600, 500
    else:
        n_seeds, width, max_epochs, n_train = 10, 256, 600, 1200
    n_seeds = args.seeds if args.seeds is not None else n_seeds
    if n_seeds < 2:
        ap.error(f"Expected --seeds to be >= 2 (an interval needs two seeds), but got {n_seeds}.")
    seeds = [args.seed_offset + i for i in range(n_seeds)]
    data = digits(seed=0, n_train=n_train)
    x, y_true, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    from torch.utils.tensorboard import SummaryWriter

    t0 = time.perf_counter()
    rows: Dict[Tuple[float, int], Dict[str, float]] = {}
    acts: Dict[Tuple[float, int], torch.Tensor] = {}
    for level in LEVELS:
        y = corrupt_labels(y_true, level, 10, torch.Generator().manual_seed(100 + args.seed_offset))
        for seed in seeds:
            rec, act = run_one(x, y, x_test, y_test, seed=seed, width=width, max_epochs=max_epochs)
            rec["corruption"] = level
            rows[(level, seed)], acts[(level, seed)] = rec, act
            epochs = int(rec["epochs"])
            with SummaryWriter(f"{args.logdir}/corrupt{level:.1f}_seed{seed}") as w:
                for layer in LAYERS:
                    w.add_scalar(f"netprobe/reliance_auc/{layer}", rec[f"auc/{layer}"], epochs)
                    w.add_scalar(f"netprobe/selectivity_mean/{layer}", rec[f"sel/{layer}"], epochs)
                w.add_scalar("netprobe/reliance_auc", rec["auc"], epochs)
                w.add_scalar("test/acc", rec["test_acc"], epochs)
                w.add_hparams({"corruption": level, "seed": seed},
                              {"hparam/test_acc": rec["test_acc"], "hparam/reliance_auc": rec["auc"]})
    elapsed = time.perf_counter() - t0

    print(f"\ndigits: MLP 64-{width}-{width}-10 (Adam, until 100 % training accuracy, at most {max_epochs} epochs), "
          f"{len(x)} training images, seeds {seeds[0]}..{seeds[-1]}; measured on the training inputs and labels")
    print(f"{'corrupt':>7} {'seed':>4} {'epochs':>6} {'train':>6} {'test':>6} "
          + " ".join(f"{'auc ' + l:>11}" for l in LAYERS) + " " + " ".join(f"{'sel ' + l:>10}" for l in LAYERS))
    for (level, seed), r in rows.items():
        print(f"{level:>7.1f} {seed:>4} {int(r['epochs']):>6} {r['train_acc']:>6.3f} {r['test_acc']:>6.3f} "
              + " ".join(f"{r[f'auc/{l}']:>11.3f}" for l in LAYERS) + " "
              + " ".join(f"{r[f'sel/{l}']:>10.3f}" for l in LAYERS))

    # PWCCA over disjoint seed pairs: independent values, paired across levels by the seed pair
    pairs = [(seeds[i], seeds[i + 1]) for i in range(0, len(seeds) - 1, 2)]
    pw = {(level, pr): float(pwcca(acts[(level, pr[0])], acts[(level, pr[1])])) for level in LEVELS for pr in pairs}

    print(f"\nper corruption level: mean and t-based 95% CI over {len(seeds)} seeds (PWCCA of {LAYERS[-1]}: over "
          f"{len(pairs)} disjoint seed pairs, on the training inputs)")
    keys = [("test_acc", "test acc")] + [(f"auc/{l}", f"auc {l}") for l in LAYERS] + [("auc", "auc mean"), ("sel", "sel mean")]
    print(f"{'corrupt':>7} " + " ".join(f"{label:>22}" for _, label in keys) + f" {'pwcca':>22}")
    for level in LEVELS:
        cells = []
        for key, _ in keys:
            m, lo, hi = t_interval([rows[(level, s)][key] for s in seeds])
            cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]")
        m, lo, hi = t_interval([pw[(level, pr)] for pr in pairs])
        cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]")
        print(f"{level:>7.1f} " + " ".join(f"{c:>22}" for c in cells))

    print("\ndifferences between corruption levels (lower minus higher corruption), paired by seed: mean and t-based 95% CI")
    conclusions: List[Tuple[str, str, str]] = []
    comparisons = [(0.0, 1.0), (0.0, 0.5), (0.5, 1.0)]
    for a, b in comparisons:
        for key, label in [(f"auc/{LAYERS[-1]}", f"reliance AUC ({LAYERS[-1]})"), ("auc", "reliance AUC (mean of layers)")]:
            m, lo, hi = t_interval([rows[(a, s)][key] - rows[(b, s)][key] for s in seeds])
            print(f"  {label:<30} {a:.0%} - {b:.0%}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            conclusions.append((f"{label} falls from {a:.0%} to {b:.0%} corruption",
                                verdict(lo, hi, margin=AUC_MARGIN, n=len(seeds)),
                                f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}], margin {AUC_MARGIN}"))
        m, lo, hi = t_interval([pw[(a, pr)] - pw[(b, pr)] for pr in pairs])
        print(f"  {f'PWCCA ({LAYERS[-1]}) between seeds':<30} {a:.0%} - {b:.0%}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
              f" ({len(pairs)} seed pairs)")
        conclusions.append((f"PWCCA between seeds falls from {a:.0%} to {b:.0%} corruption",
                            verdict(lo, hi, margin=PWCCA_MARGIN, n=len(seeds)),
                            f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}] over {len(pairs)} seed pairs, margin {PWCCA_MARGIN}"))
        for key, label in [("sel", "mean selectivity"), ("test_acc", "test accuracy")]:
            m, lo, hi = t_interval([rows[(a, s)][key] - rows[(b, s)][key] for s in seeds])
            print(f"  {label:<30} {a:.0%} - {b:.0%}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]  (descriptor)")

    runs = [rows[(level, s)] for level in LEVELS for s in seeds]
    rho = spearman([r["auc"] for r in runs], [r["test_acc"] for r in runs])
    lo, hi = bootstrap_rho([[(rows[(level, s)]["auc"], rows[(level, s)]["test_acc"]) for s in seeds] for level in LEVELS],
                           seed=args.seed_offset)
    print(f"\nSpearman rho(reliance AUC mean of layers, test accuracy) over all {len(runs)} runs: {rho:+.3f} "
          f"[{lo:+.3f}, {hi:+.3f}] (95% percentile bootstrap, runs resampled within each level, {BOOTSTRAP} times)")
    rho_v = verdict(lo, hi, margin=RHO_MARGIN, n=len(seeds)) if len(seeds) >= MIN_BOOTSTRAP_SEEDS else f"not resolved at {len(seeds)} seeds"
    conclusions.append(("reliance AUC tracks test accuracy (Spearman rho > 0)", rho_v,
                        f"rho {rho:+.3f} [{lo:+.3f}, {hi:+.3f}], margin {RHO_MARGIN}"))

    print(f"\nconclusions (yes/no only when the 95% interval clears 0 by the margin; {len(seeds)} seeds per level):")
    for claim, v, detail in conclusions:
        print(f"  {claim}: {v}   ({detail})")
    print("  (Morcos et al. 2018: reliance on single directions and similarity between networks fall as memorization rises)")
    print(f"TensorBoard logs: tensorboard --logdir {args.logdir}   ({elapsed:.0f}s)")


if __name__ == "__main__":
    main()
