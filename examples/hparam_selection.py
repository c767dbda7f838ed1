"""Pick hyperparameters without a validation set: rank a sweep by reliance on single directions
(Morcos et al. 2018) measured on the training data, then check the ranking against test accuracy.

A sweep of 24 MLP configurations on scikit-learn's digits (or `--data mnist1d`, generated
locally), sampled from learning rate, width, batch size, weight decay, dropout and batch norm. Each
is trained with `RelianceMonitor` until it fits its training data (probe-set accuracy >= `--fit`,
at most `--max-epochs`): reliance is compared between networks at equal fit, as in the paper, since
the normalized AUC of an underfit network is high. Each run's TensorBoard logs get
`netprobe/reliance_auc` and `netprobe/probe_accuracy` every epoch and `test/acc` at the end. Then
`netprobe.select.rank_runs` (the code behind `netprobe rank`) ranks the runs that fit by their last
reliance AUC and prints Kendall's tau with test accuracy and the top-k hit rates, beside the talk's
figures.

    .venv/bin/python examples/hparam_selection.py [--smoke] [--logdir runs/hparam_selection]
    netprobe rank runs/hparam_selection --metric netprobe/reliance_auc --against test/acc \
        --where 'netprobe/probe_accuracy>=0.99' --subset-size 12
"""

import argparse
import itertools
import random
import shutil
import time

import pytorch_lightning as pl
import torch

from _common import accuracy, digits, lightning_mlp, loader, mnist1d, one_thread, quiet_lightning, trainer_kwargs
from netprobe.lightning import RelianceMonitor
from netprobe.select import rank_runs, top_k_hits

GRID = {
    "lr": [3e-4, 1e-3, 3e-3, 1e-2],
    "width": [32, 128, 512],
    "batch_size": [32, 128],
    "weight_decay": [0.0, 1e-4, 1e-3],
    "dropout": [0.0, 0.2],
    "batchnorm": [False, True],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--logdir", default="runs/hparam_selection")
    ap.add_argument("--configs", type=int, default=24)
    ap.add_argument("--data", choices=("digits", "mnist1d"), default="digits")
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--fit", type=float, default=0.99, help="train each run until this probe-set (training) accuracy")
    args = ap.parse_args()
    print(f"hparam_selection.py: {one_thread()}")
    quiet_lightning()
    shutil.rmtree(args.logdir, ignore_errors=True)
    n_configs, epochs = (4, 1) if args.smoke else (args.configs, args.max_epochs)
    if args.smoke:
        args.fit = 0.0
    data = digits(seed=0) if args.data == "digits" else mnist1d(seed=0, num_samples=1000 if args.smoke else 4000)
    d_in = data["x_train"].shape[1]
    all_configs = [dict(zip(GRID, vals)) for vals in itertools.product(*GRID.values())]
    configs = random.Random(0).sample(all_configs, n_configs)
    t0 = time.perf_counter()
    for i, cfg in enumerate(configs):
        pl.seed_everything(i, verbose=False)
        model = lightning_mlp(d_in, [cfg["width"], cfg["width"]], 10, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                              dropout=cfg["dropout"], batchnorm=cfg["batchnorm"])
        logger = pl.loggers.TensorBoardLogger(args.logdir, name=f"cfg{i:02d}", version="")
        logger.log_hyperparams(cfg)
        mon = RelianceMonitor(["net.relu1", "net.relu2"], num_samples=128 if args.smoke else 512)
        # Train until the network fits its training data (reliance compares networks at equal fit).
        # (Lightning stops once the value is > stopping_threshold, compared in float32; we mean >= --fit)
        fitted = pl.callbacks.EarlyStopping(monitor="netprobe/probe_accuracy", mode="max", stopping_threshold=args.fit - 1e-6,
                                            patience=10**9, check_on_train_epoch_end=True)
        trainer = pl.Trainer(max_epochs=epochs, callbacks=[mon, fitted], logger=logger, **trainer_kwargs())
        trainer.fit(model, loader(data["x_train"], data["y_train"], batch_size=cfg["batch_size"], seed=i))
        acc = accuracy(model, data["x_test"], data["y_test"])
        logger.log_metrics({"test/acc": acc}, step=trainer.global_step)
        logger.save()
        logger.experiment.flush()
        cm = trainer.callback_metrics
        print(f"cfg{i:02d} {cfg}  epochs {trainer.current_epoch:>2}  train acc {float(cm['netprobe/probe_accuracy']):.3f}  "
              f"reliance_auc {float(cm['netprobe/reliance_auc']):.3f}  test acc {acc:.3f}", flush=True)
    print(f"sweep of {n_configs} configurations: {time.perf_counter() - t0:.0f}s")

    fit = f"netprobe/probe_accuracy>={args.fit:g}"
    res = rank_runs(args.logdir, "netprobe/reliance_auc", against="test/acc", top_k=None, where=[fit])  # k = 1, 5, 10 below the run count
    m = max(2, len(res["runs"]) // 2)
    if len(res["runs"]) > m:  # top-k hit rates over random subsets of half the fitted runs (as --subset-size does)
        sigs, refs = [r["signal"] for r in res["runs"]], [r["reference"] for r in res["runs"]]
        hits = top_k_hits(sigs, refs, tuple(k for k in (1, 5, 10) if k < m), subset_size=m, n_draws=10_000)
        res.update(top_k={str(k): p for k, p in hits.items()}, subset_size=m, n_draws=10_000)
    print(f"\n{'rank':>4} {'run':<6} {'reliance_auc':>12} {'test acc':>8} {'test rank':>9}")
    for r in res["runs"]:
        print(f"{r['rank']:>4} {r['run']:<6} {r['signal']:>12.3f} {r['reference']:>8.3f} {r['reference_rank']:>9.1f}")
    for sk in res["skipped"]:
        print(f"skipped {sk['run']}: {sk['reason']}")
    if len(res["runs"]) < 2:
        print(f"\nonly {len(res['runs'])} run(s) fit their training data: raise --max-epochs or lower --fit")
        return
    if res["kendall_tau"] is None:
        print("\nthe signal or the test accuracy is the same for every run: no ranking to compare")
        return
    m = res["subset_size"] or len(res["runs"])
    print(f"\nKendall tau(reliance AUC, test acc) = {res['kendall_tau']:.3f} (talk: 0.13)   Spearman rho = {res['spearman_rho']:.3f}")
    print(f"pick among all {len(res['runs'])} runs that fit: {res['pick']} (test-accuracy rank {res['pick_reference_rank']:.0f})")
    print(f"pick by reliance in random subsets of {m} runs ({res['n_draws']} draws):")
    print(f"{'':>10} {'netprobe':>9} {'random pick':>11} {'talk (48 configs)':>18}")
    talk = {"1": None, "5": 0.83, "10": 0.98}
    for k, p in res["top_k"].items():
        t = talk[k]
        print(f"  top-{k:<4} {p:>9.2f} {min(1.0, int(k) / m):>11.2f} {('-' if t is None else f'{t:.2f}'):>18}")
    print("(the talk's figures as the issue cites them; see README 'Findings reproduced')")
    print(f"\nSame ranking from the command line:\n  netprobe rank {args.logdir} --metric netprobe/reliance_auc "
          f"--against test/acc --where '{fit}' --subset-size {m}")


if __name__ == "__main__":
    main()
