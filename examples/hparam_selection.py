"""Which logged signal ranks the runs of a sweep best? A multi-seed sweep of small 1-D ConvNets on
MNIST-1D, ranked by every netprobe reliance key, the training loss and a 100-example validation set,
each judged against the accuracy on a large test set.

The sweep: `--configs` configurations (default 24) sampled from width, depth, learning rate, batch
size, weight decay, dropout, batch norm and augmentation, times `--seeds` seeds each (default 3), all
trained for the same `--epochs` (default 25; `--grid wide` adds width 4 and learning rate 1e-4, 20
epochs, so that a third of the runs stay near chance) with Adam on 2000 MNIST-1D training examples (generated
locally: `mnist1d`'s generator, no download). Every conv stage's ReLU is monitored by
`RelianceMonitor` at its defaults (256 training examples, 3 fixed orders, 5 fractions). Each run's
TensorBoard logs (`--logdir`, one directory per run, named after its hyperparameters and seed) get,
every epoch, netprobe's keys (`netprobe/reliance_auc[/<layer>]`, `netprobe/reliance_area[/<layer>]`,
`netprobe/probe_accuracy`), the training loss (`train/loss`, epoch mean) and the accuracy on 100
held-out labelled examples (`val100/acc`); at the end, the accuracy on 5900 test examples
(`test/acc`).

`--regime interpolate` is the other regime, the one single-direction reliance was proposed for:
every network is trained until it fits its training data (1000 MNIST-1D examples; training
accuracy 1.0, on the whole unaugmented training set in eval mode, at the end of 3 consecutive
epochs; at most `--epochs`, default 150), over width 32/64, depth 2/3, learning rate, batch size,
weight decay, dropout, batch norm and the initialization's scale (`GRID_FIT`). The runs that never
fit are reported (names and count) and left out of the ranking. `RelianceMonitor(noise=True)`
logs `netprobe/noise_auc` beside the ablation keys in both regimes. `--config-slice START:STOP`
trains part of the sampled configurations (to split a sweep over processes; `--analyze-only` on
the parent directory then ranks them together).

Then the ranking, with `netprobe rank --signals` (`netprobe.select.rank_signals`) and, for the
intervals over configurations, the runs' values read with `netprobe.select.load_runs`:

1. the multi-signal table over runs, with percentile bootstrap intervals over runs and top-k hit
   rates beside a random pick's k/m, and its cross-validated choice of signal (random half splits
   of the runs);
2. the same signals with intervals from a bootstrap over *configurations* (all seeds of a resampled
   configuration together): seeds of one configuration are not independent runs, so the library's
   run bootstrap is too narrow here; and the configurations ranked by their seed-averaged signals,
   with a cross-validated choice over half splits of the configurations (no configuration on both
   sides);
3. conclusions, each stated only when its configuration-bootstrap interval clears the threshold by
   `MARGIN`; otherwise "not resolved with N runs";
4. the same verdicts *within strata* (Kendall tau over the pairs of runs of the same width and
   depth, what `netprobe rank` compares without `--across`), and the test accuracy lost by
   picking each stratum's run with the best signal, beside a random pick's.

    .venv/bin/python examples/hparam_selection.py [--smoke | --quick] [--seed-offset 0] [--logdir runs/hparam_selection]
    .venv/bin/python examples/hparam_selection.py --analyze-only --logdir runs/hparam_selection  # rank again
    .venv/bin/python examples/hparam_selection.py --regime interpolate --configs 80 --seeds 2 --logdir runs/interpolate
        # docs/ranking.md's study: about 40 minutes at one thread (or 4 processes with --config-slice
        # 0:20, 20:40, ... and their own --logdir under one directory, then --analyze-only on it)
    netprobe rank runs/hparam_selection --against test/acc --signals 'netprobe/reliance_*' \
        --signals netprobe/probe_accuracy --baseline train/loss:min --baseline val100/acc:max --across

``--quick`` (about a minute and a half at one thread: QUICK's configurations, seeds, epochs and data
sizes) is the reduced form tests/example_scripts/test_hparam_selection_quick.py runs to check the conclusions that
hold at that size; ``--seed-offset K`` shifts every seed (data generation, configuration sampling,
training, bootstrap), so that a conclusion can be checked not to depend on one draw.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import shutil
import time
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from _common import accuracy, mnist1d, one_thread, quiet_lightning, trainer_kwargs, verdict
from netprobe.lightning import RelianceMonitor
from netprobe.select import cross_validate_choice, kendall_tau, layer_order, load_runs

GRID = {  # the default sweep: most runs learn something in 25 epochs (test accuracy about 0.3-0.97)
    "width": [8, 16, 32, 64],
    "depth": [1, 2, 3],
    "lr": [3e-4, 1e-3, 3e-3, 1e-2],
    "batch_size": [32, 128],
    "weight_decay": [0.0, 1e-4, 1e-3],
    "dropout": [0.0, 0.1, 0.3],
    "batchnorm": [False, True],
    "augment": [False, True],
}
GRID_WIDE = {  # --grid wide (20 epochs): also width 4 and lr 1e-4, so that a third of the runs stay near chance
    "width": [4, 8, 16, 32, 64],
    "depth": [1, 2, 3],
    "lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "batch_size": [32, 128],
    "weight_decay": [0.0, 1e-4, 1e-3],
    "dropout": [0.0, 0.1, 0.3],
    "batchnorm": [False, True],
    "augment": [False, True],
}
GRID_FIT = {  # --regime interpolate: every network is trained until it fits its 1000 training examples
    "width": [32, 64],  # (width 16 or one stage: some never fit within 150 epochs)
    "depth": [2, 3],
    "lr": [1e-3, 3e-3],
    "batch_size": [32, 64],
    "weight_decay": [0.0, 1e-4],
    "dropout": [0.0, 0.1],
    "batchnorm": [False, True],
    "augment": [False],
    "init_scale": [0.5, 1.0, 2.0],
}
#: --regime interpolate: training examples, and the epochs at training accuracy 1.0 that end a run
N_TRAIN_FIT, FIT_EPOCHS = 1000, 3
LENGTH = 40  # MNIST-1D signals
N_TRAIN, N_VAL = 2000, 100
#: --quick: the reduced sweep the test suite runs (configurations, seeds, epochs, generated / training examples, bootstrap)
QUICK = {"configs": 12, "seeds": 2, "epochs": 10, "num_samples": 4000, "n_train": 1000, "boot": 500, "num_samples_probe": 128}
#: a conclusion is stated only when its 95 % interval clears the threshold (0, or a difference of 0) by this much
MARGIN = 0.02
#: fewer configurations than this: no interval is trusted and no conclusion stated (a bootstrap over 3 clusters says nothing)
MIN_CONFIGS = 8
#: probe-set (training) accuracy from which a run counts as fitting its training data
FIT = 0.95
SIGNALS = ["netprobe/reliance_auc", "netprobe/reliance_auc@deepest", "netprobe/reliance_auc/*",
           "netprobe/reliance_area", "netprobe/reliance_area@deepest", "netprobe/reliance_area/*",
           "netprobe/noise_auc", "netprobe/noise_auc@deepest", "netprobe/probe_accuracy"]
#: the reliance metrics read per layer (noise_auc only where the sweep logged it)
METRICS = ("reliance_auc", "reliance_area", "noise_auc")
BASELINES = ["train/loss:min", "val100/acc:max"]


class ConvNet1d(pl.LightningModule):
    """`depth` stages of Conv1d(k=5, same padding) -> [BatchNorm1d] -> ReLU (``features.relu<i>``, the
    monitored layers) -> [Dropout] -> MaxPool1d(2), then a Linear on the flattened map; Adam.
    ``init_scale`` multiplies every weight of the default initialization."""

    def __init__(self, *, width: int, depth: int, lr: float, weight_decay: float, dropout: float, batchnorm: bool,
                 augment: bool, val: Tuple[torch.Tensor, torch.Tensor], init_scale: float = 1.0) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.augment, self.val = lr, weight_decay, augment, val
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        c = 1
        for i in range(1, depth + 1):
            layers[f"conv{i}"] = nn.Conv1d(c, width, 5, padding=2)
            if batchnorm:
                layers[f"bn{i}"] = nn.BatchNorm1d(width)
            layers[f"relu{i}"] = nn.ReLU()
            if dropout:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            layers[f"pool{i}"] = nn.MaxPool1d(2)
            c = width
        self.features = nn.Sequential(layers)
        self.head = nn.Linear(width * (LENGTH >> depth), 10)
        if init_scale != 1.0:
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if name.endswith("weight") and p.ndim > 1:
                        p.mul_(init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x[:, None] if x.ndim == 2 else x).flatten(1))

    def training_step(self, batch, _):
        x, y = batch
        if self.augment:  # a random circular shift of up to 3 samples and a little noise (torch's RNG, seeded per run)
            n = x.shape[0]
            shift = torch.randint(-3, 4, (n, 1))
            x = x.gather(1, (torch.arange(LENGTH)[None] - shift) % LENGTH) + 0.05 * torch.randn_like(x)
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("val100/acc", accuracy(self, *self.val))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class StopWhenFit(pl.Callback):
    """Ends a run once its accuracy on the whole training set (eval mode, unaugmented) has been 1.0
    at the end of ``epochs`` consecutive epochs, and logs it as ``train/acc`` every epoch
    (:func:`train_sweep` then logs ``fit/epochs`` and ``fit/reached``, 1.0 if the run fit)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, epochs: int = FIT_EPOCHS) -> None:
        self.x, self.y, self.epochs, self.streak = x, y, epochs, 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        acc = accuracy(pl_module, self.x, self.y)
        pl_module.log("train/acc", acc)
        self.streak = self.streak + 1 if acc == 1.0 else 0
        if self.streak >= self.epochs:
            trainer.should_stop = True

    @property
    def reached(self) -> bool:
        return self.streak >= self.epochs


def make_data(smoke: bool, *, quick: bool = False, seed: int = 0, n_train: int = N_TRAIN) -> Dict[str, torch.Tensor]:
    """MNIST-1D generated locally (generator seed ``seed``): 2000 training examples, 100 labelled
    validation examples, and the rest of the generated examples (5900) as the test set (``--quick``:
    1000, 100 and 2900; ``--smoke``: 300, 100 and 1600; ``n_train`` sets the first number)."""
    d = mnist1d(seed=seed, num_samples=2000 if smoke else QUICK["num_samples"] if quick else 8000)
    n_tr, n_val = (300, 100) if smoke else (QUICK["n_train"], N_VAL) if quick else (n_train, N_VAL)
    x, y = d["x_train"], d["y_train"]
    return {"x_train": x[:n_tr], "y_train": y[:n_tr], "x_val": x[n_tr:n_tr + n_val], "y_val": y[n_tr:n_tr + n_val],
            "x_test": torch.cat([x[n_tr + n_val:], d["x_test"]]), "y_test": torch.cat([y[n_tr + n_val:], d["y_test"]])}


def run_name(ci: int, cfg: Dict, seed: int) -> str:
    init = f"_is{cfg['init_scale']:g}" if "init_scale" in cfg else ""
    return (f"c{ci:02d}_w{cfg['width']}_d{cfg['depth']}_lr{cfg['lr']:g}_bs{cfg['batch_size']}_wd{cfg['weight_decay']:g}"
            f"_do{cfg['dropout']:g}_bn{int(cfg['batchnorm'])}_aug{int(cfg['augment'])}{init}_s{seed}")


def sample_configs(n: int, grid: Dict[str, list], *, seed: int = 0) -> List[Dict]:
    all_configs = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]
    return random.Random(seed).sample(all_configs, n)


def run_seeds(n_seeds: int, offset: int = 0) -> List[int]:
    """The training seeds of every configuration: ``0..n_seeds-1``, shifted by ``100 * offset``."""
    return [100 * offset + s for s in range(n_seeds)]


def train_sweep(args, configs: Sequence[Dict], seeds: Sequence[int], epochs: int) -> None:
    """Train and log every run (``--regime interpolate``: each until it fits, at most ``epochs``)."""
    fit_regime = args.regime == "interpolate"
    data = make_data(args.smoke, quick=args.quick, seed=args.seed_offset, n_train=N_TRAIN_FIT if fit_regime else N_TRAIN)
    print(f"MNIST-1D: {len(data['y_train'])} training, {len(data['y_val'])} validation, {len(data['y_test'])} test examples")
    shutil.rmtree(args.logdir, ignore_errors=True)
    t0 = time.perf_counter()
    unfit = []
    lo, hi = args.config_slice
    for ci, cfg in enumerate(configs):
        if not lo <= ci < hi:
            continue
        for seed in seeds:
            t1 = time.perf_counter()
            name = run_name(ci, cfg, seed)
            pl.seed_everything(1000 * ci + seed, verbose=False)
            model = ConvNet1d(**{k: v for k, v in cfg.items() if k != "batch_size"}, val=(data["x_val"], data["y_val"]))
            logger = pl.loggers.TensorBoardLogger(args.logdir, name=name, version="", default_hp_metric=False)
            logger.log_hyperparams(dict(cfg, seed=seed, config=ci))
            layers = [f"features.relu{i}" for i in range(1, cfg["depth"] + 1)]
            mon = RelianceMonitor(layers, noise=True, **({"num_samples": 64} if args.smoke else
                                                         {"num_samples": QUICK["num_samples_probe"]} if args.quick else {}))
            stop = StopWhenFit(data["x_train"], data["y_train"])
            trainer = pl.Trainer(max_epochs=epochs, callbacks=[mon] + ([stop] if fit_regime else []), logger=logger,
                                 **trainer_kwargs())
            dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data["x_train"], data["y_train"]),
                                             batch_size=cfg["batch_size"], shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
            trainer.fit(model, dl)
            acc = accuracy(model, data["x_test"], data["y_test"])
            final = {"test/acc": acc}
            if fit_regime:
                final.update({"fit/epochs": float(trainer.current_epoch), "fit/reached": float(stop.reached)})
                if not stop.reached:
                    unfit.append(name)
            logger.log_metrics(final, step=trainer.global_step)
            logger.save()
            logger.experiment.flush()
            cm = trainer.callback_metrics
            fit = f"  {'fit' if stop.reached else 'NOT FIT'} after {trainer.current_epoch} epochs" if fit_regime else ""
            print(f"{name:<58} train loss {float(cm['train/loss']):.3f}  probe acc {float(cm['netprobe/probe_accuracy']):.3f}  "
                  f"reliance_auc {float(cm['netprobe/reliance_auc']):.3f}  val100 {float(cm['val100/acc']):.2f}  "
                  f"test {acc:.3f}{fit}  ({time.perf_counter() - t1:.1f}s)", flush=True)
    n_cfg = len(range(len(configs))[lo:hi])
    print(f"sweep of {n_cfg} configurations x {len(seeds)} seeds = {n_cfg * len(seeds)} runs, "
          f"{epochs} epochs {'at most ' if fit_regime else ''}each: {time.perf_counter() - t0:.0f}s")
    if fit_regime:
        print(f"{len(unfit)} of {n_cfg * len(seeds)} runs did not reach training accuracy 1.0 for {FIT_EPOCHS} "
              f"epochs within {epochs} epochs (left out of the ranking)" + (": " + ", ".join(unfit) if unfit else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="3 runs of 2 epochs on a small data set (< 1 minute)")
    mode.add_argument("--quick", action="store_true",
                      help=f"the reduced sweep the test suite checks: {QUICK['configs']} configurations x {QUICK['seeds']} "
                           f"seeds, {QUICK['epochs']} epochs, {QUICK['n_train']} training examples (~1.5 min)")
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="shift every seed: data generation, configuration sampling, training and bootstrap (default 0)")
    ap.add_argument("--logdir", default="runs/hparam_selection")
    ap.add_argument("--configs", type=int, default=None, help=f"default 24 (--quick {QUICK['configs']})")
    ap.add_argument("--seeds", type=int, default=None, help=f"default 3 (--quick {QUICK['seeds']})")
    ap.add_argument("--grid", choices=("default", "wide"), default="default",
                    help="wide: also width 4 and lr 1e-4 (many runs near chance), 20 epochs unless --epochs")
    ap.add_argument("--regime", choices=("mixed", "interpolate"), default="mixed",
                    help=f"interpolate: {N_TRAIN_FIT} training examples, every run trained until its training accuracy "
                         f"is 1.0 for {FIT_EPOCHS} epochs (at most --epochs, default 150; runs that never fit are "
                         f"reported and left out), over init scale too; mixed (default): a fixed number of epochs")
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"epochs per run (default 25; 20 with --grid wide; {QUICK['epochs']} with --quick)")
    ap.add_argument("--config-slice", default=None, metavar="START:STOP",
                    help="train only the sampled configurations START..STOP-1 (to split a sweep over processes, each "
                         "with its own --logdir under one directory; then --analyze-only on that directory)")
    ap.add_argument("--analyze-only", action="store_true", help="rank the runs already under --logdir")
    ap.add_argument("--boot", type=int, default=None, help=f"bootstrap replicates (default 2000; --quick {QUICK['boot']})")
    args = ap.parse_args()
    try:
        lo, hi = (int(v) for v in args.config_slice.split(":")) if args.config_slice else (0, 10**9)
    except ValueError:
        ap.error(f"--config-slice takes START:STOP (two integers), got {args.config_slice!r}")
    if not 0 <= lo < hi:
        ap.error(f"--config-slice START:STOP needs 0 <= START < STOP, got {args.config_slice!r}")
    args.config_slice = (lo, hi)
    q = args.quick
    args.configs = args.configs or (QUICK["configs"] if q else 24)
    args.seeds = args.seeds or (QUICK["seeds"] if q else 3)
    args.boot = args.boot or (QUICK["boot"] if q else 2000)
    print(f"hparam_selection.py: {one_thread()}")
    quiet_lightning()
    if args.regime == "interpolate" and (args.grid != "default" or q):
        ap.error("--regime interpolate has its own grid and sizes: drop --grid and --quick")
    grid = GRID_FIT if args.regime == "interpolate" else GRID_WIDE if args.grid == "wide" else GRID
    epochs = args.epochs or (150 if args.regime == "interpolate" else 20 if args.grid == "wide" else QUICK["epochs"] if q else 25)
    n_configs, n_seeds, epochs = (3, 1, 2) if args.smoke else (args.configs, args.seeds, epochs)
    t0 = time.perf_counter()
    if not args.analyze_only:
        train_sweep(args, sample_configs(n_configs, grid, seed=args.seed_offset), run_seeds(n_seeds, args.seed_offset), epochs)
    analyze(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s (seed offset {args.seed_offset})")


class Sweep(NamedTuple):
    """The runs of a sweep as :func:`read_runs` reads them (one entry per run in each array)."""

    names: List[str]
    configs: np.ndarray  #: configuration ids
    ref: np.ndarray  #: test accuracies
    sig: Dict[str, Tuple[np.ndarray, str]]  #: {signal: (values, direction)}
    layer_of: Dict[str, str]  #: {per-layer signal: layer}
    strata: np.ndarray  #: stratum ids: (width, depth), the facts `netprobe rank` groups by
    fit_logged: bool  #: some run logged `fit/reached` (--regime interpolate)


def read_runs(logdir: str, *, drop_unfit: bool = True) -> Sweep:
    """Each readable run's last values (:class:`Sweep`); a signal a run did not log (a layer its
    depth lacks) is NaN. Runs that logged ``fit/reached`` 0 (``--regime interpolate``: never fit)
    are left out with ``drop_unfit``. Read with ``netprobe.select.load_runs`` (the same reader as
    ``netprobe rank``); the deepest layer from ``netprobe.select.layer_order``."""
    runs = sorted((r for r in load_runs(logdir) if r.error is None and "test/acc" in r.scalars), key=lambda r: r.name)
    fit_logged = any("fit/reached" in r.scalars for r in runs)
    if drop_unfit:
        runs = [r for r in runs if not r.scalars.get("fit/reached") or r.scalars["fit/reached"][-1][1] == 1.0]

    def last(r, tag: str) -> float:
        s = r.scalars.get(tag)
        return float(s[-1][1]) if s else math.nan

    names = [r.name for r in runs]
    configs = np.array([int(r.hparams.get("config", r.name[1:3])) for r in runs])
    ref = np.array([last(r, "test/acc") for r in runs])
    depth = max((len(layer_order(r, "reliance_auc")[0]) for r in runs), default=1)
    sig: Dict[str, Tuple[np.ndarray, str]] = {}
    layer_of: Dict[str, str] = {}
    for metric in METRICS:
        if not any(f"netprobe/{metric}" in r.scalars for r in runs):
            continue
        sig[f"netprobe/{metric}"] = (np.array([last(r, f"netprobe/{metric}") for r in runs]), "max")
        sig[f"netprobe/{metric}@deepest"] = (np.array([last(r, f"netprobe/{metric}/{layer_order(r, metric)[0][-1]}")
                                                       if layer_order(r, metric)[0] else math.nan for r in runs]), "max")
        for i in range(1, depth + 1):
            key = f"netprobe/{metric}/features.relu{i}"
            sig[key] = (np.array([last(r, key) for r in runs]), "max")
            layer_of[key] = f"relu{i}"
    sig["netprobe/probe_accuracy"] = (np.array([last(r, "netprobe/probe_accuracy") for r in runs]), "max")
    sig["train/loss"] = (np.array([last(r, "train/loss") for r in runs]), "min")
    sig["val100/acc"] = (np.array([last(r, "val100/acc") for r in runs]), "max")
    strata = {(r.hparams.get("width"), r.hparams.get("depth")) for r in runs}
    index = {k: i for i, k in enumerate(sorted(strata, key=str))}
    stratum = np.array([index[(r.hparams.get("width"), r.hparams.get("depth"))] for r in runs])
    return Sweep(names, configs, ref, sig, layer_of, stratum, fit_logged)


def oriented(values: np.ndarray, direction: str) -> np.ndarray:
    return values if direction == "max" else -values


def tau_on(x: np.ndarray, y: np.ndarray) -> float:
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return math.nan
    return float(kendall_tau(x[keep], y[keep]))


def tau_within(x: np.ndarray, y: np.ndarray, strata: np.ndarray) -> float:
    """Kendall's tau-b over the pairs of runs in the same stratum (NaN values left out)."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, st = x[keep], y[keep], strata[keep]
    return tau_b_pairs(x, y, np.triu(st[:, None] == st[None, :], 1)) if len(x) >= 3 else math.nan


def stratum_regret(x: np.ndarray, ref: np.ndarray, strata: np.ndarray) -> float:
    """The mean over strata (of 2+ runs with the signal) of the best reference in the stratum minus
    the reference of the run the signal ranks first there (ties: their mean reference)."""
    out = []
    for st in np.unique(strata):
        m = (strata == st) & np.isfinite(x)
        if m.sum() >= 2:
            out.append(ref[m].max() - ref[m][x[m] == x[m].max()].mean())
    return float(np.mean(out)) if out else math.nan


def random_regret(ref: np.ndarray, strata: np.ndarray, have: Optional[np.ndarray] = None) -> float:
    """:func:`stratum_regret` of a uniformly random pick among the runs ``have`` (default all; pass a
    signal's finite values to compare with it on the same strata): the best minus the mean
    reference, averaged over the strata of 2+ such runs."""
    have = np.ones(len(ref), bool) if have is None else have
    out = [ref[m].max() - ref[m].mean() for st in np.unique(strata) if (m := (strata == st) & have).sum() >= 2]
    return float(np.mean(out)) if out else math.nan


def tau_b_pairs(x: np.ndarray, y: np.ndarray, pairs: np.ndarray) -> float:
    """Kendall's tau-b over the pairs ``(i, j)`` with ``pairs[i, j]`` (an upper-triangular mask):
    ``sum sign(dx) sign(dy) / sqrt(#pairs untied in x * #pairs untied in y)``; over all ``i < j``
    pairs this is the usual tau-b."""
    sx, sy = np.sign(x[:, None] - x[None, :])[pairs], np.sign(y[:, None] - y[None, :])[pairs]
    nx, ny = np.count_nonzero(sx), np.count_nonzero(sy)
    return float((sx * sy).sum() / math.sqrt(nx * ny)) if nx and ny else math.nan


def cluster_bootstrap(sig: Dict[str, np.ndarray], ref: np.ndarray, clusters: np.ndarray, *, n_boot: int,
                      seed: int = 0, strata: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Kendall's tau-b of each (oriented) signal with ``ref`` over the runs, recomputed on ``n_boot``
    resamples of the *clusters* (configurations) with replacement, each taking all its runs:
    ``{signal: (n_boot,) taus}`` (replicate ``b`` is the same resample for every signal, so
    differences between signals are paired). A pair of runs from two draws of the same configuration
    is left out: it is neither a pair within one configuration (the resample has one per draw, as the
    data has one per configuration) nor a pair across configurations, and counting it would
    over-weight the within-configuration pairs (seed noise) by the multiplicity of the draw. With
    ``strata`` (one id per run), only pairs of runs in the same stratum count: tau *within* strata."""
    ids = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in ids]
    rng = np.random.default_rng(seed)
    out = {s: np.full(n_boot, np.nan) for s in sig}
    for b in range(n_boot):
        draws = rng.integers(0, len(ids), len(ids))
        idx = np.concatenate([members[j] for j in draws])
        draw_of = np.repeat(np.arange(len(draws)), [len(members[j]) for j in draws])
        same = (clusters[idx][:, None] == clusters[idx][None, :]) & (draw_of[:, None] != draw_of[None, :])
        if strata is not None:
            same |= strata[idx][:, None] != strata[idx][None, :]
        for s, v in sig.items():
            x, y = v[idx], ref[idx]
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() < 3:
                continue
            pairs = np.triu(~same[np.ix_(ok, ok)], 1)
            out[s][b] = tau_b_pairs(x[ok], y[ok], pairs)
    return out


def config_means(osig: Dict[str, np.ndarray], ref: np.ndarray, configs: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
    """The configuration level: ``(config ids (sorted), (C,) mean reference, {signal: (C,) mean over the
    seeds that have it, NaN when none})``. A cross-validated choice over these ``C`` values splits
    configurations, so no configuration has seeds on both sides."""
    ids = np.unique(configs)
    cref = np.array([ref[configs == c].mean() for c in ids])
    csig = {s: np.array([np.nanmean(v[configs == c]) if np.isfinite(v[configs == c]).any() else math.nan
                         for c in ids]) for s, v in osig.items()}
    return ids, cref, csig


def interval(draws: np.ndarray, level: float = 0.95) -> Tuple[float, float]:
    d = draws[np.isfinite(draws)]
    if len(d) < 10:
        return math.nan, math.nan
    a = (1 - level) / 2
    return float(np.quantile(d, a)), float(np.quantile(d, 1 - a))


def fmt_ci(ci: Tuple[float, float]) -> str:
    return "[   -,    -]" if not all(map(math.isfinite, ci)) else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def sign_of(ci: Tuple[float, float]) -> str:
    """'yes' / 'no' when the interval clears 0 by more than MARGIN above / below (``_common.verdict``)."""
    return verdict(ci[0], ci[1], margin=MARGIN, n=0)


def verdict_sign(what: str, ci: Tuple[float, float], n: int) -> str:
    v = sign_of(ci)
    if v == "yes":
        return f"{what} agrees with test accuracy (tau interval {fmt_ci(ci)} above 0 by more than {MARGIN})"
    if v == "no":
        return f"{what} points the WRONG way (tau interval {fmt_ci(ci)} below 0 by more than {MARGIN})"
    return f"{what}: agreement with test accuracy not resolved with {n} runs (tau interval {fmt_ci(ci)})"


def verdict_diff(a: str, b: str, ci: Tuple[float, float], n: int) -> str:
    v = sign_of(ci)
    if v == "yes":
        return f"{a} ranks better than {b} (tau difference {fmt_ci(ci)})"
    if v == "no":
        return f"{b} ranks better than {a} (tau difference of {a} minus {b}: {fmt_ci(ci)})"
    return f"{a} vs {b}: not resolved with {n} runs (tau difference {fmt_ci(ci)})"


def analyze(args) -> None:
    from netprobe.cli import main as netprobe_main

    names, configs, ref, sig, layer_of, strata, fit_logged = read_runs(args.logdir, drop_unfit=not args.smoke)
    n, n_cfg = len(names), len(np.unique(configs))
    n_boot = 200 if args.smoke else args.boot
    if n < 2:
        print(f"only {n} run(s) with test/acc under {args.logdir}: nothing to rank")
        return
    print(f"\n{n} runs of {n_cfg} configurations; test accuracy {ref.min():.3f}-{ref.max():.3f} "
          f"(median {np.median(ref):.3f}); training probe-set accuracy {np.nanmin(sig['netprobe/probe_accuracy'][0]):.3f}-"
          f"{np.nanmax(sig['netprobe/probe_accuracy'][0]):.3f}")

    # 1. the library's multi-signal table (bootstrap over runs), exactly as the command prints it; the
    # sweep varies the width, so its runs form strata: --across judges them together, with each
    # signal's tau against the width printed beside it
    m = max(2, n // 3)
    argv = [args.logdir, "--against", "test/acc"] + [a for s in SIGNALS for a in ("--signals", s)] \
        + [a for b in BASELINES for a in ("--baseline", b)] + ["--boot", str(n_boot), "--cv", "0" if n < 6 else "200"] \
        + ["--across"] \
        + (["--where", "fit/reached>=1"] if fit_logged and not args.smoke else []) \
        + (["--seed", str(args.seed_offset)] if getattr(args, "seed_offset", 0) else [])
    if n >= 6:
        argv += ["--subset-size", str(m), "--top-k", ",".join(str(k) for k in (1, 5) if k < m)]
    print("\n== 1. netprobe rank (intervals: bootstrap over RUNS, which treats the seeds of a configuration as "
          "independent runs; too narrow here, see 2.) ==")
    print("$ netprobe rank " + " ".join(a if not any(c in a for c in "*@") else f"'{a}'" for a in argv) + "\n", flush=True)
    netprobe_main(["rank"] + argv)

    # 2. Kendall tau over runs, with intervals from a bootstrap over configurations
    osig = {s: oriented(v, d) for s, (v, d) in sig.items()}
    so = getattr(args, "seed_offset", 0)
    boot = cluster_bootstrap(osig, ref, configs, n_boot=n_boot, seed=so)
    cfg_ids, cfg_ref, cfg_sig = config_means(osig, ref, configs)
    cfg_boot = cluster_bootstrap(cfg_sig, cfg_ref, cfg_ids, n_boot=n_boot, seed=so + 1)
    in_boot = cluster_bootstrap(osig, ref, configs, n_boot=n_boot, seed=so + 4, strata=strata)
    n_strata = len(np.unique(strata))
    print(f"\n== 2. Kendall tau with test accuracy, 95% intervals from {n_boot} bootstrap resamples of the "
          f"{n_cfg} CONFIGURATIONS (all seeds of a resampled configuration together) ==")
    print("runs: each run ranked by its own last values; configs: each configuration by its signals averaged "
          "over seeds, against its mean test accuracy; pick: the configuration the seed-averaged signal picks, "
          "its test-accuracy rank and its mean test accuracy below the best configuration's; within strata: "
          f"tau over the pairs of runs of the same width and depth ({n_strata} strata, what `netprobe rank` "
          "compares without --across), and the mean over strata of the test accuracy lost by picking each "
          "stratum's run with the best signal (a random pick's loss beside it)")
    best_cfg = cfg_ref.max()
    head = (f"{'signal':<40} {'dir':>3} {'runs':>4}  {'Kendall tau':>11} {'95% CI':<16} {'configs':>7} {'tau':>6} "
            f"{'95% CI':<16} {'pick rank':>9} {'regret':>6}  {'within':>6} {'95% CI':<16} {'regret':>6} {'random':>6}")
    print(head)
    taus: Dict[str, float] = {}
    within: Dict[str, float] = {}
    for s, v in osig.items():
        have = np.isfinite(v)
        t = tau_on(v, ref)
        taus[s] = t
        ct = tau_on(cfg_sig[s], cfg_ref)
        hc = np.isfinite(cfg_sig[s])
        if hc.sum() >= 2:
            v = cfg_sig[s][hc]
            tied = np.flatnonzero(hc)[v == v.max()]  # a tie for the best: the mean over the tied configurations
            rank = np.mean([1 + (cfg_ref[hc] > cfg_ref[b]).sum() + ((cfg_ref[hc] == cfg_ref[b]).sum() - 1) / 2 for b in tied])
            pick = f"{rank:>4.1f} of {hc.sum():<2} {best_cfg - cfg_ref[tied].mean():>6.3f}"
        else:
            pick = f"{'-':>9} {'-':>6}"
        f = lambda x, w: f"{x:>+{w}.3f}" if math.isfinite(x) else f"{'-':>{w}}"  # noqa: E731
        within[s] = tau_within(osig[s], ref, strata)
        print(f"{s:<40} {sig[s][1]:>3} {have.sum():>4}  {f(t, 11)} {fmt_ci(interval(boot[s])):<16} {hc.sum():>7} "
              f"{f(ct, 6)} {fmt_ci(interval(cfg_boot[s])):<16} {pick}  {f(within[s], 6)} "
              f"{fmt_ci(interval(in_boot[s])):<16} {f(stratum_regret(osig[s], ref, strata), 6)} "
              f"{f(random_regret(ref, strata, np.isfinite(osig[s])), 6)}")
    print("(the last column: a random pick's loss within the same strata, among the runs that have the signal)")
    other = np.array([ref[(configs == c) & (np.arange(n) != i)].mean() if ((configs == c).sum() > 1) else math.nan
                      for i, c in enumerate(configs)])
    if np.isfinite(other).sum() >= 3:
        b_other = cluster_bootstrap({"other": other}, ref, configs, n_boot=n_boot, seed=so + 3)["other"]
        print(f"(for scale: the mean test accuracy of the OTHER seeds of a run's configuration, a signal that knows the "
              f"configuration perfectly but not the seed, has Kendall tau {tau_on(other, ref):+.3f} "
              f"{fmt_ci(interval(b_other))} with the run's own test accuracy)")
    if n_cfg >= 6:
        # candidates: the netprobe signals every configuration has (a layer only deep networks have cannot rank the others)
        every = [s for s in osig if s not in ("train/loss", "val100/acc") and np.isfinite(cfg_sig[s]).all()]
        print(f"\ncross-validated choice over CONFIGURATIONS (200 random half splits of the {n_cfg} configurations, no "
              f"configuration on both sides; the signal with the best tau on one half, judged on the other):")
        for label, cands in (("netprobe signals every configuration has", every),
                             ("reliance keys only", [s for s in every if s.startswith("netprobe/reliance")])):
            if not cands:
                continue
            cv = cross_validate_choice({s: cfg_sig[s] for s in cands}, cfg_ref, n_splits=200, seed=so,
                                       baselines={s: cfg_sig[s] for s in ("train/loss", "val100/acc")})
            chosen = sorted(((c, s) for s, c in cv["chosen"].items() if c), reverse=True)
            ht = cv["heldout_tau"]
            print(f"  among the {len(cands)} {label}: held-out tau of the chosen signal mean {ht['mean']:+.3f}, 95% of "
                  f"splits in {fmt_ci(tuple(ht['interval']))}; chosen: "
                  + ", ".join(f"{s} {c / max(cv['used'], 1):.0%}" for c, s in chosen[:4]))
        for s, b in cv["baselines"].items():
            print(f"  baseline {s} on the same held-out halves: tau mean {b['mean']:+.3f}, 95% of splits in "
                  f"{fmt_ci(tuple(b['interval']))}")
    conclusions(args, names, configs, ref, sig, osig, boot, taus, layer_of, n_boot)
    within_conclusions(osig, in_boot, within, len(names), n_strata, n_cfg)


def within_conclusions(osig, in_boot, within, n: int, n_strata: int, n_cfg: int) -> None:
    """The verdicts within strata (pairs of runs of the same width and depth): each key's agreement
    with test accuracy, and the differences that choose the recommended key."""
    print(f"\n== 4. within strata (Kendall tau over the pairs of runs of the same width and depth, {n_strata} strata; "
          f"configuration-bootstrap intervals, verdicts at margin {MARGIN}) ==")
    if n_cfg < MIN_CONFIGS:
        print(f"  none stated: {n_cfg} configurations, fewer than {MIN_CONFIGS} (not resolved with {n} runs)")
        return
    keys = [k for k in ("netprobe/reliance_auc", "netprobe/reliance_auc@deepest", "netprobe/reliance_area",
                        "netprobe/reliance_area@deepest", "netprobe/noise_auc", "netprobe/noise_auc@deepest",
                        "netprobe/probe_accuracy", "train/loss", "val100/acc") if k in osig]
    for k in keys:
        print("  - " + verdict_sign(f"{k} (within strata, tau {within[k]:+.3f})", interval(in_boot[k]), n))
    pairs = [("netprobe/reliance_auc@deepest", "netprobe/reliance_auc"), ("netprobe/noise_auc", "netprobe/reliance_auc"),
             ("netprobe/noise_auc@deepest", "netprobe/reliance_auc@deepest"), ("netprobe/reliance_area", "netprobe/reliance_auc"),
             ("train/loss", "netprobe/reliance_auc@deepest"), ("train/loss", "netprobe/noise_auc"),
             ("val100/acc", "netprobe/reliance_auc@deepest"), ("val100/acc", "netprobe/noise_auc")]
    for a, b in pairs:
        if a in osig and b in osig:
            print("  - within strata: " + verdict_diff(a, b, interval(in_boot[a] - in_boot[b]), n))


def conclusions(args, names, configs, ref, sig, osig, boot, taus, layer_of, n_boot) -> None:
    n = len(names)
    auc, deep, first = "netprobe/reliance_auc", "netprobe/reliance_auc@deepest", "netprobe/reliance_auc/features.relu1"
    area, area_deep = "netprobe/reliance_area", "netprobe/reliance_area@deepest"
    loss, val = "train/loss", "val100/acc"
    ci = lambda s: interval(boot[s])  # noqa: E731
    dci = lambda a, b: interval(boot[a] - boot[b])  # noqa: E731
    print(f"\n== 3. conclusions (Kendall tau over the {n} runs; each stated only when its 95% interval from the "
          f"configuration bootstrap clears the threshold by {MARGIN}) ==")
    n_cfg = len(np.unique(configs))
    if n_cfg < MIN_CONFIGS:
        print(f"  none stated: {n_cfg} configurations, fewer than {MIN_CONFIGS} (not resolved with {n} runs)")
        return
    for s, what in ((auc, "the default key netprobe/reliance_auc (mean over layers)"), (deep, "the deepest layer's reliance_auc"),
                    (first, "the first layer's reliance_auc"), (area, "netprobe/reliance_area (mean)"),
                    (area_deep, "the deepest layer's reliance_area"), ("netprobe/probe_accuracy", "netprobe/probe_accuracy"),
                    (loss, "the training loss"), (val, "the 100-example validation accuracy")):
        print("  - " + verdict_sign(what, ci(s), n))
    for a, b in ((deep, auc), (deep, first), (area, auc), (loss, auc), (loss, deep), (loss, area_deep), (val, loss), (val, deep)):
        print("  - " + verdict_diff(a, b, dci(a, b), n))
    # subsets by training (probe-set) accuracy: the lower and upper halves, and the runs that fit (>= FIT)
    pa = sig["netprobe/probe_accuracy"][0]
    med = float(np.nanmedian(pa))
    pa_key = "netprobe/probe_accuracy"
    for label, mask in ((f"lower half by training accuracy (probe accuracy <= {med:.3f})", pa <= med),
                        (f"upper half by training accuracy (probe accuracy > {med:.3f})", pa > med),
                        (f"runs that fit their training data (probe accuracy >= {FIT})", pa >= FIT)):
        n_sub, c_sub = int(mask.sum()), len(np.unique(configs[mask]))
        if c_sub < MIN_CONFIGS:
            print(f"  - {label}: {n_sub} runs of {c_sub} configurations, fewer than {MIN_CONFIGS}: not resolved")
            continue
        sub = {s: osig[s][mask] for s in (auc, deep, area, pa_key, loss, val)}
        b = cluster_bootstrap(sub, ref[mask], configs[mask], n_boot=n_boot, seed=getattr(args, "seed_offset", 0) + 2)
        print(f"  - {label}, {n_sub} runs of {c_sub} configurations, test accuracy {ref[mask].min():.3f}-{ref[mask].max():.3f}: "
              + "; ".join(f"{s.replace('netprobe/', '')} {tau_on(v, ref[mask]):+.2f} {fmt_ci(interval(b[s]))}" for s, v in sub.items()))
        for s in (auc, deep, area):
            v = sign_of(interval(b[s]))
            if v == "no":
                print(f"    -> here {s} points the WRONG way")
            elif v == "yes":
                print(f"    -> here {s} agrees with test accuracy")
            else:
                print(f"    -> here {s}: not resolved with {n_sub} runs")
        for a_, b_ in ((loss, deep), (val, deep)):
            print("    -> " + verdict_diff(a_, b_, interval(b[a_] - b[b_]), n_sub))
    # what reliance adds beyond the training accuracy it is normalized by
    print("  - " + verdict_diff(area, pa_key, dci(area, pa_key), n) + "  [reliance_area = reliance_auc x probe_accuracy]")
    print("  - " + verdict_diff(pa_key, loss, dci(pa_key, loss), n))
    best_rel = max((s for s in osig if s.startswith("netprobe/reliance") and np.isfinite(osig[s]).all()),
                   key=lambda s: -math.inf if not math.isfinite(taus[s]) else taus[s])
    lo_, hi_ = ci(best_rel)
    print(f"  - with no labelled hold-out at all: the best reliance key here, {best_rel} (chosen on these runs, so "
          f"optimistic), has Kendall tau {taus[best_rel]:+.3f} {fmt_ci((lo_, hi_))}; "
          + ("better than a random ranking" if sign_of((lo_, hi_)) == "yes" else "not resolved against a random ranking")
          + f"; the training loss, also free of held-out labels: {taus[loss]:+.3f} {fmt_ci(ci(loss))}; the training "
          f"accuracy on the probe set: {taus[pa_key]:+.3f} {fmt_ci(ci(pa_key))}")


if __name__ == "__main__":
    main()
