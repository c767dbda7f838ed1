"""Is a class-selective unit an important one? And what does batch norm do to selectivity and
information? (Morcos et al. 2018, sections 3.4-3.5.)

MLPs with two hidden layers are trained on scikit-learn's digits (or MNIST-1D, generated locally),
with and without batch norm (Linear -> BatchNorm1d -> ReLU), over several seeds. For every network
and hidden ReLU layer we measure on the HELD-OUT split (a network at 100 % training accuracy loses
no training sample when one unit is ablated, so the training set cannot rank its units):

* importance of each unit: the accuracy drop when it alone is zero-ablated (`unit_importance`);
* its class selectivity (`class_selectivity`) and mutual information with the label in bits
  (`mutual_information`, 16 equal-frequency bins);
* the same information with shuffled labels (its estimation bias, which depends on the bins a
  unit occupies), subtracted for the comparison of batch norm;
* Spearman's rho between importance and selectivity (and between importance and information)
  over the layer's live units, averaged over the two layers: one value per network.

Intervals are t-based 95 % confidence intervals over seeds (for batch norm's effect: of the
difference within each seed, BN minus no BN). A conclusion is printed only when its interval
clears the threshold by a margin; otherwise the line says "not resolved at this number of seeds".
The paper's findings: selectivity is a poor predictor of importance; batch norm lowers
selectivity and raises information.

    .venv/bin/python examples/importance.py [--smoke | --quick] [--seeds 10] [--data digits|mnist1d] [--logdir runs/importance]

Writes TensorBoard logs (one run per network, `netprobe/importance_selectivity_rho/<layer>`, ...).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from _common import accuracy, digits, mlp, mnist1d, one_thread, train
from netprobe import probe
from netprobe.metrics import class_selectivity, mutual_information
from netprobe.metrics.importance import spearman, unit_importance

LAYERS = ["relu1", "relu2"]
#: |rho| below this is a "poor predictor"; above it (same sign over the interval) a useful one
POOR_RHO = 0.5
#: margins by which an interval must clear a threshold before a conclusion is printed
RHO_MARGIN = 0.1
SEL_MARGIN = 0.02  # selectivity index units
MI_MARGIN = 0.02  # bits


def t_interval(values: Sequence[float]) -> Tuple[float, float, float]:
    """Mean and t-based 95 % confidence interval of the mean (NaN-free input, n >= 2)."""
    from scipy.stats import t

    v = np.asarray(values, float)
    n = len(v)
    mean = float(v.mean())
    if n < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.975, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def rho_verdict(lo: float, hi: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "not resolved at this number of seeds"
    if -(POOR_RHO - RHO_MARGIN) < lo and hi < POOR_RHO - RHO_MARGIN:
        return f"selectivity is a POOR predictor of importance (|rho| < {POOR_RHO} over the whole interval, with margin {RHO_MARGIN})"
    if lo > POOR_RHO + RHO_MARGIN:
        return f"selective units ARE the important ones (rho > {POOR_RHO})"
    if hi < -(POOR_RHO + RHO_MARGIN):
        return f"selective units are the UNimportant ones (rho < -{POOR_RHO})"
    return "not resolved at this number of seeds"


def diff_verdict(what: str, lo: float, hi: float, margin: float) -> str:
    if math.isfinite(lo) and hi < -margin:
        return f"batch norm LOWERS {what}"
    if math.isfinite(lo) and lo > margin:
        return f"batch norm RAISES {what}"
    if math.isfinite(lo) and -margin < lo and hi < margin:
        return f"batch norm changes {what} by less than the margin (no effect of that size)"
    return "not resolved at this number of seeds"


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Per layer: rho(importance, selectivity), rho(importance, information), mean selectivity and
    mean information over live units, on (x, y)."""
    rec: Dict[str, float] = {}
    with probe(model, LAYERS, capacity=len(x)) as p:
        model.eval()
        with torch.no_grad():
            model(x)
    for layer in LAYERS:
        imp = unit_importance(model, layer, (x, y))
        sel = class_selectivity(p[layer], y, num_classes=10)
        mi = mutual_information(p[layer], y, num_classes=10, bins=16)
        # the plug-in estimate's upward bias depends on how many bins a unit occupies (a ReLU's zeros
        # merge bins): the same estimate with shuffled labels measures it, unit by unit
        shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
        mi_null = mutual_information(p[layer], shuffled, num_classes=10, bins=16)
        live = ~sel.dead
        drop = imp.accuracy_drop[live]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a layer whose units all tie: NaN, left out below
            rec[f"rho_sel/{layer}"] = float(spearman(drop, sel.values[live]))
            rec[f"rho_mi/{layer}"] = float(spearman(drop, mi[live]))
        rec[f"sel/{layer}"] = float(sel.mean)
        rec[f"mi/{layer}"] = float(mi[live].mean())
        rec[f"mi_above_null/{layer}"] = float((mi - mi_null)[live].mean())
        rec[f"dead/{layer}"] = float(sel.num_dead)
        rec[f"important/{layer}"] = float((imp.accuracy_drop > 0).double().mean())
    for key in ("rho_sel", "rho_mi", "sel", "mi", "mi_above_null"):
        vals = [rec[f"{key}/{l}"] for l in LAYERS if math.isfinite(rec[f"{key}/{l}"])]
        rec[key] = float(np.mean(vals)) if vals else float("nan")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description="Class selectivity vs single-unit importance, with and without batch norm")
    ap.add_argument("--smoke", "--quick", dest="smoke", action="store_true", help="reduced sizes (used by the test suite)")
    ap.add_argument("--logdir", default="runs/importance")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--data", choices=["digits", "mnist1d"], default="digits")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    print(f"importance.py: {one_thread()}")
    t0 = time.perf_counter()
    n_seeds, width, epochs = (4, 64, 30) if args.smoke else (args.seeds, args.width, args.epochs)
    data = digits(seed=0) if args.data == "digits" else mnist1d(seed=0, num_samples=4000)
    x, y, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    from torch.utils.tensorboard import SummaryWriter

    rows: List[Dict[str, float]] = []
    for bn in (False, True):
        for seed in range(n_seeds):
            torch.manual_seed(seed)
            model = mlp(x.shape[1], [width, width], 10, batchnorm=bn)
            train(model, x, y, epochs=epochs, lr=1e-3, batch_size=128, generator=torch.Generator().manual_seed(seed))
            rec = {"bn": float(bn), "seed": float(seed), "train_acc": accuracy(model, x, y), "test_acc": accuracy(model, x_test, y_test)}
            rec.update(measure(model, x_test, y_test))
            rows.append(rec)
            with SummaryWriter(f"{args.logdir}/{'bn' if bn else 'plain'}_seed{seed}") as w:
                for layer in LAYERS:
                    w.add_scalar(f"netprobe/importance_selectivity_rho/{layer}", rec[f"rho_sel/{layer}"], epochs)
                    w.add_scalar(f"netprobe/importance_mi_rho/{layer}", rec[f"rho_mi/{layer}"], epochs)
                    w.add_scalar(f"netprobe/selectivity_mean/{layer}", rec[f"sel/{layer}"], epochs)
                    w.add_scalar(f"netprobe/mutual_info_mean/{layer}", rec[f"mi/{layer}"], epochs)
                w.add_scalar("netprobe/importance_selectivity_rho", rec["rho_sel"], epochs)
                w.add_scalar("netprobe/importance_mi_rho", rec["rho_mi"], epochs)
                w.add_scalar("test/acc", rec["test_acc"], epochs)

    print(f"\n{args.data}: MLP {x.shape[1]}-{width}-{width}-10, {epochs} epochs (Adam), {n_seeds} seeds per arm; measured on "
          f"the {len(x_test)} held-out samples")
    print(f"{'bn':>3} {'seed':>4} {'train':>6} {'test':>6} " + " ".join(f"{'rho_sel ' + l:>13}" for l in LAYERS)
          + " " + " ".join(f"{'rho_mi ' + l:>12}" for l in LAYERS) + " " + " ".join(f"{'sel ' + l:>10}" for l in LAYERS)
          + " " + " ".join(f"{'mi ' + l:>9}" for l in LAYERS) + f" {'important':>9}")
    for r in rows:
        print(f"{int(r['bn']):>3} {int(r['seed']):>4} {r['train_acc']:>6.3f} {r['test_acc']:>6.3f} "
              + " ".join(f"{r[f'rho_sel/{l}']:>+13.3f}" for l in LAYERS) + " " + " ".join(f"{r[f'rho_mi/{l}']:>+12.3f}" for l in LAYERS)
              + " " + " ".join(f"{r[f'sel/{l}']:>10.3f}" for l in LAYERS) + " " + " ".join(f"{r[f'mi/{l}']:>9.3f}" for l in LAYERS)
              + f" {np.mean([r[f'important/{l}'] for l in LAYERS]):>9.2f}")
    print("(rho: Spearman over a layer's live units of importance = accuracy drop when the unit alone is zero-ablated;"
          " 'important': share of units whose ablation costs accuracy)")

    print(f"\nper network (mean over {len(LAYERS)} layers), mean and t-based 95% CI over seeds")
    verdicts: Dict[str, str] = {}
    for bn in (False, True):
        arm = [r for r in rows if r["bn"] == float(bn)]
        name = "with batch norm" if bn else "without batch norm"
        for key, label in (("rho_sel", "rho(importance, selectivity)"), ("rho_mi", "rho(importance, information)")):
            vals = [r[key] for r in arm if math.isfinite(r[key])]
            m, lo, hi = t_interval(vals) if vals else (float("nan"),) * 3
            skipped = f" ({len(arm) - len(vals)} network(s) without a defined rho left out)" if len(vals) < len(arm) else ""
            print(f"  {name:<19} {label:<30} {m:+.3f}  [{lo:+.3f}, {hi:+.3f}]{skipped}")
            if key == "rho_sel":
                verdicts[name] = rho_verdict(lo, hi)
    plain = {int(r["seed"]): r for r in rows if r["bn"] == 0.0}
    normed = {int(r["seed"]): r for r in rows if r["bn"] == 1.0}
    diffs = {}
    for key, label in (("sel", "mean class selectivity"), ("mi", "mean information (bits)"),
                       ("mi_above_null", "information above null"), ("test_acc", "test accuracy")):
        mp, lp, hp = t_interval([plain[s][key] for s in plain])
        mb, lb, hb = t_interval([normed[s][key] for s in normed])
        diffs[key] = t_interval([normed[s][key] - plain[s][key] for s in plain])
        md, ld, hd = diffs[key]
        print(f"  {label:<24} no BN {mp:.3f} [{lp:.3f}, {hp:.3f}]   BN {mb:.3f} [{lb:.3f}, {hb:.3f}]   "
              f"BN - no BN {md:+.3f} [{ld:+.3f}, {hd:+.3f}]")

    bias = 15 * 9 / (2 * len(x_test) * math.log(2))
    print(f"  (the plug-in information is biased upwards by about (B-1)(C-1)/(2n ln 2) bits: {bias:.3f} at B = 16 occupied "
          f"bins, C = 10, n = {len(x_test)}, less where a ReLU's zeros merge bins; 'above null' subtracts each unit's "
          "information with shuffled labels, and the conclusion uses it)")

    print("\nconclusions (each printed only when its 95% interval clears the threshold by the stated margin):")
    for name, v in verdicts.items():
        print(f"  importance vs selectivity, {name}: {v}")
    print(f"  selectivity: {diff_verdict('class selectivity', *diffs['sel'][1:], SEL_MARGIN)} (margin {SEL_MARGIN})")
    print(f"  information: {diff_verdict('mutual information', *diffs['mi_above_null'][1:], MI_MARGIN)} (margin {MI_MARGIN} bits)")
    print("  (Morcos et al. 2018: selectivity a poor predictor of importance; batch norm lowers selectivity, raises information)")
    print(f"TensorBoard logs: tensorboard --logdir {args.logdir}   ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
