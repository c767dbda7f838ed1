"""Memorizing networks rely more on single directions (Morcos et al. 2018, Fig. 1-2).

MLPs are trained to 100 % training accuracy on scikit-learn's digits with 0 %, 50 % and 100 % of
the training labels replaced by random ones, over several seeds. For each run we measure, on the
TRAINING inputs with the labels the network was trained on:

* reliance AUC per hidden layer: area under the cumulative zero-ablation curve (random unit order,
  3 orders), normalized by the unablated accuracy (1.0 = ablation does not hurt);
* mean class selectivity per hidden layer;
* PWCCA between the last hidden layers of every pair of seeds at the same corruption level;

and test accuracy on the true test labels. Expected (the papers): reliance AUC and PWCCA fall as
corruption rises, and AUC correlates with test accuracy.

    .venv/bin/python examples/memorization.py [--smoke] [--logdir runs/memorization]

Writes TensorBoard logs (one run per network, `netprobe/...` keys + hparams) under --logdir.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from _common import accuracy, corrupt_labels, digits, mlp, one_thread, train
from netprobe import probe
from netprobe.metrics import ablation_curve, class_selectivity, pwcca

LAYERS = ["relu1", "relu2"]


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description="Memorization vs reliance on single directions")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (used by the test suite)")
    ap.add_argument("--logdir", default="runs/memorization")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    print(f"memorization.py: {one_thread()}")
    levels = [0.0, 0.5, 1.0]
    seeds = list(range(2 if args.smoke else args.seeds))
    width, max_epochs = (32, 10) if args.smoke else (256, 600)
    data = digits(seed=0, n_train=300 if args.smoke else 1200)
    x, y_true, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    from torch.utils.tensorboard import SummaryWriter

    rows, acts = [], {}
    t0 = time.perf_counter()
    for level in levels:
        y = corrupt_labels(y_true, level, 10, torch.Generator().manual_seed(100))
        for seed in seeds:
            torch.manual_seed(seed)
            model = mlp(64, [width, width], 10)
            epochs = train(model, x, y, epochs=max_epochs, lr=1e-3, batch_size=128,
                           generator=torch.Generator().manual_seed(seed), stop_at_train_acc=1.0)
            train_acc, test_acc = accuracy(model, x, y), accuracy(model, x_test, y_test)
            rec = {"corruption": level, "seed": seed, "epochs": epochs, "train_acc": train_acc, "test_acc": test_acc}
            for layer in LAYERS:
                curve = ablation_curve(model, layer, (x, y), repeats=3, generator=torch.Generator().manual_seed(seed))
                rec[f"auc/{layer}"] = float(curve.auc)
            with probe(model, LAYERS, capacity=len(x)) as p:
                model.eval()
                with torch.no_grad():
                    model(x)
            for layer in LAYERS:
                rec[f"sel/{layer}"] = float(class_selectivity(p[layer], y, num_classes=10).mean)
            acts[(level, seed)] = p[LAYERS[-1]]
            rec["auc"] = float(np.mean([rec[f"auc/{l}"] for l in LAYERS]))
            rows.append(rec)
            with SummaryWriter(f"{args.logdir}/corrupt{level:.1f}_seed{seed}") as w:
                for layer in LAYERS:
                    w.add_scalar(f"netprobe/reliance_auc/{layer}", rec[f"auc/{layer}"], epochs)
                    w.add_scalar(f"netprobe/selectivity_mean/{layer}", rec[f"sel/{layer}"], epochs)
                w.add_scalar("netprobe/reliance_auc", rec["auc"], epochs)
                w.add_scalar("test/acc", test_acc, epochs)
                w.add_hparams({"corruption": level, "seed": seed}, {"hparam/test_acc": test_acc, "hparam/reliance_auc": rec["auc"]})

    print(f"\n{'corrupt':>7} {'seed':>4} {'epochs':>6} {'train':>6} {'test':>6} "
          + " ".join(f"{'auc ' + l:>11}" for l in LAYERS) + " " + " ".join(f"{'sel ' + l:>10}" for l in LAYERS))
    for r in rows:
        print(f"{r['corruption']:>7.1f} {r['seed']:>4} {r['epochs']:>6} {r['train_acc']:>6.3f} {r['test_acc']:>6.3f} "
              + " ".join(f"{r[f'auc/{l}']:>11.3f}" for l in LAYERS) + " "
              + " ".join(f"{r[f'sel/{l}']:>10.3f}" for l in LAYERS))

    print(f"\nper corruption level (mean over {len(seeds)} seeds; PWCCA of {LAYERS[-1]} between seed pairs, on the training inputs)")
    print(f"{'corrupt':>7} {'test acc':>8} " + " ".join(f"{'auc ' + l:>11}" for l in LAYERS) + f" {'sel mean':>8} {'pwcca':>6}")
    summary = []
    for level in levels:
        rs = [r for r in rows if r["corruption"] == level]
        pw = [float(pwcca(acts[(level, a)], acts[(level, b)])) for a, b in itertools.combinations(seeds, 2)]
        s = {
            "level": level, "test": np.mean([r["test_acc"] for r in rs]),
            **{l: np.mean([r[f"auc/{l}"] for r in rs]) for l in LAYERS},
            "sel": np.mean([np.mean([r[f"sel/{l}"] for l in LAYERS]) for r in rs]), "pwcca": np.mean(pw),
        }
        summary.append(s)
        print(f"{level:>7.1f} {s['test']:>8.3f} " + " ".join(f"{s[l]:>11.3f}" for l in LAYERS)
              + f" {s['sel']:>8.3f} {s['pwcca']:>6.3f}")
    rho = spearman([r["auc"] for r in rows], [r["test_acc"] for r in rows])
    print(f"\nSpearman rho(reliance AUC, test accuracy) over all {len(rows)} runs: {rho:.3f}")
    falls = all(summary[i][LAYERS[-1]] > summary[i + 1][LAYERS[-1]] for i in range(len(summary) - 1))
    pw_falls = all(summary[i]["pwcca"] > summary[i + 1]["pwcca"] for i in range(len(summary) - 1))
    print(f"reliance AUC ({LAYERS[-1]}) falls as corruption rises: {falls}; PWCCA falls: {pw_falls}")
    print(f"TensorBoard logs: tensorboard --logdir {args.logdir}   ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
