"""The three netprobe monitors. Each composes the capture engine and the metrics; none
re-implements a metric. See :mod:`netprobe.lightning.base` for the behaviour they share."""

from __future__ import annotations

import copy
import warnings
import zlib
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe import viz
from netprobe._modules import evaluating
from netprobe._validation import check_finite
from netprobe.lightning.base import NetprobeMonitor
from netprobe.metrics.ablation import (DEFAULT_SCALES, MaxElements, NonFiniteError, _check_budget, _check_points, ablation_curve,
                                      noise_curve, score, selectivity_order)
from netprobe.metrics.importance import spearman, unit_importance
from netprobe.metrics.information import MutualInfoAccumulator, quantile_edges
from netprobe.metrics.selectivity import SelectivityAccumulator, SelectivityResult
from netprobe.metrics.similarity import (RBF_MAX_SAMPLES, SideStats, SimilarityAccumulator, _check_keep, linear_cka, procrustes,
                                         rbf_cka, similarity_matrix)

__all__ = ["SelectivityMonitor", "RelianceMonitor", "ConvergenceMonitor"]

#: RelianceMonitor's default ablated fractions (5 points; the paper's 11 are ablation_curve's default):
#: chosen with num_samples=256 and repeats=3 from benchmarks/reliance_precision.py (README, "Reliance
#: defaults"): a quarter of the cost of (512 samples, 3 orders, 11 fractions), no noisier overall
RELIANCE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _check_class_scores(who: str, mon: NetprobeMonitor, out: Optional[torch.Tensor]) -> None:
    """Ablation scores accuracy and loss: the model must return (batch, num_classes) class scores."""
    if out is None or out.ndim != 2 or out.shape[1] < 2:
        got = "not a tensor (a tuple or dict?)" if out is None else f"of shape {tuple(out.shape)}"
        raise ValueError(
            f"{who}: accuracy under ablation needs the model to return class scores (batch, num_classes) "
            f"with at least 2 classes, but its output is {got}. Override `forward(pl_module, x)` in a subclass to "
            "return the scores (for a single binary logit z: `torch.cat([-z, z], 1)`)."
        )
    assert mon._probe is not None
    top = int(mon._probe[1].max()) if mon._probe[1].numel() else 0
    if top >= out.shape[1]:
        raise ValueError(f"{who}: probe targets reach class {top}, but the model returns {out.shape[1]} scores.")


#: the metrics a failed selectivity leaves without the layer's value (importance's rho needs it too)
_SELECTIVITY_SKIP = ("selectivity_mean", "dead_fraction", "importance_selectivity_rho", "importance_mi_rho")


def _probe_selectivity(mon: NetprobeMonitor, acts: torch.Tensor, labels: torch.Tensor) -> SelectivityResult:
    """Class selectivity over the whole probe set (this rank's shard, reduced across ranks); the
    shard's input checks are agreed across ranks first, so a failure skips the layer everywhere."""
    labels = labels.to(acts.device)
    acc = mon._agreed(lambda: SelectivityAccumulator(mon.num_classes).update(acts, labels), acts.device)  # type: ignore[arg-type]
    return acc.all_reduce().compute()


class SelectivityMonitor(NetprobeMonitor):
    """Class selectivity of each monitored layer's units on the probe set, every epoch.

    Logs ``netprobe/selectivity_mean/<layer>`` (mean over live units), ``netprobe/selectivity_mean``
    (mean over layers), ``netprobe/dead_fraction/<layer>`` (units never active on the probe set),
    optionally ``netprobe/mutual_info_mean[/<layer>]`` (bits), and with a TensorBoardLogger a
    histogram ``netprobe/selectivity/<layer>`` of per-unit selectivity.

    Monitor post-ReLU layers (selectivity is defined for non-negative activations); conv layers
    are reduced to per-channel spatial means. Memory: the probe set, plus per layer
    ``num_samples x d`` floats while computing and ``8 num_classes (d + 1)`` bytes of statistics.

    **Do selective units matter?** (Morcos et al. 2018) With ``importance=True`` it also ablates each
    unit alone on the probe set (:func:`~netprobe.metrics.unit_importance`: ``d + 1`` evaluations
    of the probe set per layer, stacked) and logs Spearman's rho between the units' importance and
    their selectivity, ``netprobe/importance_selectivity_rho[/<layer>]``, and with ``mutual_info``
    their information, ``netprobe/importance_mi_rho[/<layer>]`` (dead units left out; rho near 0 =
    selectivity says nothing about which units matter), and a TensorBoard scatter of importance
    against selectivity at media epochs (``netprobe/importance_vs_selectivity``). Importance is the
    rise of the probe-set loss by default (``importance_by="loss_rise"``): on a training probe set a
    network near 100 % accuracy often loses no example to any single ablation, so every accuracy
    drop is 0 and rho is undefined (then not logged, with a warning).

    Args:
        layers: see :class:`~netprobe.lightning.base.NetprobeMonitor`.
        mutual_info: also log per-unit mutual information with the label (equal-frequency bins).
        bins: bins for mutual information.
        histograms: log the per-unit histogram to TensorBoard.
        importance: also measure single-unit importance and its rank correlations (see above).
        importance_by: ``"loss_rise"`` (default) or ``"accuracy_drop"``.
        importance_mode: ``"zero"`` (default) or ``"mean"`` ablation of the unit.
        **kwargs: ``num_samples``, ``every_n_epochs``, ``probe_data``, ``batch_size``, ``seed``,
            ``num_classes``, ``media_every`` (see the base).

    Example:
        >>> SelectivityMonitor(layers=["relu1", "relu2"], mutual_info=True).metrics
        ('selectivity_mean', 'dead_fraction', 'mutual_info_mean')
        >>> SelectivityMonitor(layers=["relu1"], mutual_info=True, importance=True).metrics[-2:]
        ('importance_selectivity_rho', 'importance_mi_rho')
    """

    def __init__(self, layers: Any, *, mutual_info: bool = False, bins: int = 16, histograms: bool = True,
                 importance: bool = False, importance_by: str = "loss_rise", importance_mode: str = "zero",
                 **kwargs: Any) -> None:
        super().__init__(layers, **kwargs)
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"Expected `bins` to be an int >= 2, but got {bins!r}.")
        if importance_by not in ("loss_rise", "accuracy_drop"):
            raise ValueError(f"Expected `importance_by` to be 'loss_rise' or 'accuracy_drop', but got {importance_by!r}.")
        if importance_mode not in ("zero", "mean"):
            raise ValueError(f"Expected `importance_mode` to be 'zero' or 'mean', but got {importance_mode!r}.")
        self.mutual_info = bool(mutual_info)
        self.bins = bins
        self.histograms = bool(histograms)
        self.importance, self.importance_by, self.importance_mode = bool(importance), importance_by, importance_mode
        self.metrics = (("selectivity_mean", "dead_fraction") + (("mutual_info_mean",) if mutual_info else ())
                        + (("importance_selectivity_rho",) if importance else ())
                        + (("importance_mi_rho",) if importance and mutual_info else ()))

    def _check(self, widths: Mapping[str, int], n: int, acts: Mapping[str, torch.Tensor], out: Optional[torch.Tensor]) -> None:
        if self.importance:
            _check_class_scores("SelectivityMonitor (importance=True)", self, out)
        neg = {k: float(a.min()) for k, a in acts.items() if a.numel() and bool((a < 0).any())}
        if neg and not self.mutual_info:  # mutual information is defined for any sign: then only selectivity skips
            raise ValueError(
                f"SelectivityMonitor: class selectivity is defined for non-negative (post-ReLU) activations, but layers "
                f"{sorted(neg)} give negative values on the probe inputs (min {min(neg.values()):.3g}). Monitor the "
                "activation after them (e.g. the ReLU module), or use ConvergenceMonitor for such layers."
            )

    def _validate(self, pl_module: nn.Module) -> None:
        super()._validate(pl_module)
        if self.importance:  # a layer single-unit ablation cannot handle fails now, not after the first epoch
            assert self._probe is not None
            x, y = self._probe
            fwd = _ForwardAdapter(self, pl_module)
            for layer in self.layers:
                try:
                    unit_importance(fwd, f"module.{layer}", [(x[:8], y[:8])], mode=self.importance_mode,
                                    layout=self._per_layer(self.layout, layer), select=self._per_layer(self.select, layer),
                                    observe=self._layout_decisions)
                except (ValueError, TypeError) as err:
                    raise type(err)(f"SelectivityMonitor: layer {layer!r} cannot be ablated unit by unit: {err}") from err

    def compute(self, trainer: Any, pl_module: nn.Module) -> Tuple[Dict[str, float], Dict[str, Any]]:
        x, y, _ = self._shard()
        acts, model_out = self._probe_pass(trainer, pl_module, x)
        sel, dead, mi, hists = {}, {}, {}, {}
        per_unit_sel: Dict[str, SelectivityResult] = {}
        per_unit_mi: Dict[str, torch.Tensor] = {}
        for layer, a in acts.items():
            ya = y.to(a.device)
            try:
                res = _probe_selectivity(self, a, ya)
                dead[layer] = res.num_dead / res.num_units
                if res.num_dead == res.num_units:
                    raise ValueError("every unit was zero on the whole probe set (dead_fraction 1), so no unit has a selectivity")
                sel[layer] = float(res.mean)
                per_unit_sel[layer] = res
                if self.histograms and self._media_due:
                    hists[f"netprobe/selectivity/{layer}"] = res.values[~res.dead]
            except ValueError as err:
                self._warn_skip(layer, "selectivity", err, _SELECTIVITY_SKIP)
            if self.mutual_info:  # any sign is fine here; only finiteness is checked first
                try:
                    self._agreed(lambda: check_finite(a, f"activations of {layer!r}"), a.device)
                    full = _dist.all_gather_cat(a)
                    edges = quantile_edges(full, bins=self.bins)
                    mi_acc = MutualInfoAccumulator(self.num_classes, bins=self.bins, edges=edges)  # type: ignore[arg-type]
                    per_unit_mi[layer] = mi_acc.update(a, ya).all_reduce().compute()
                    mi[layer] = float(per_unit_mi[layer].mean())
                except ValueError as err:
                    self._warn_skip(layer, "mutual information", err, ("mutual_info_mean", "importance_mi_rho"))
        out: Dict[str, float] = {}
        self._layer_values("selectivity_mean", sel, out)
        self._layer_values("dead_fraction", dead, out)
        if self.mutual_info:
            self._layer_values("mutual_info_mean", mi, out)
        figs: Dict[str, Any] = {}
        if self.importance:
            rho_sel, rho_mi, points = self._importance(pl_module, x, y, model_out, per_unit_sel, per_unit_mi)
            self._layer_values("importance_selectivity_rho", rho_sel, out)
            if self.mutual_info:
                self._layer_values("importance_mi_rho", rho_mi, out)
            if points and self._media_due and _dist.rank() == 0 and _has_tensorboard(trainer):
                figs["netprobe/importance_vs_selectivity"] = viz.scatter_figure(
                    points, title=f"single-unit importance vs class selectivity, epoch {trainer.current_epoch}",
                    xlabel="class selectivity", ylabel=self.importance_by.replace("_", " "))
        return out, {"histograms": hists, "figures": figs}

    def _importance(self, pl_module: nn.Module, x: torch.Tensor, y: torch.Tensor, model_out: Optional[torch.Tensor],
                    per_unit_sel: Mapping[str, SelectivityResult], per_unit_mi: Mapping[str, torch.Tensor]
                    ) -> Tuple[Dict[str, float], Dict[str, float], Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
        """Per layer: Spearman's rho of single-unit importance with selectivity and with information
        (over live units), and the (selectivity, importance) points of the scatter."""
        assert model_out is not None  # checked before the first step
        base = self._agreed(lambda: score(model_out, y.to(model_out.device)), model_out.device)
        data = self._batched(x, y)
        fwd = _ForwardAdapter(self, pl_module)
        rho_sel: Dict[str, float] = {}
        rho_mi: Dict[str, float] = {}
        points: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in self.layers:
            res = per_unit_sel.get(layer)
            if res is None:  # no selectivity this epoch (warned)
                continue
            try:
                imp = unit_importance(fwd, f"module.{layer}", data, mode=self.importance_mode, distributed=True, unablated=base,
                                      layout=self._per_layer(self.layout, layer), select=self._per_layer(self.select, layer),
                                    observe=self._layout_decisions)
                values = getattr(imp, self.importance_by).cpu()
                live = ~res.dead.cpu()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # undefined rho: said below, once
                    r = float(spearman(values[live], res.values.cpu()[live]))
                    r_mi = float(spearman(values[live], per_unit_mi[layer].cpu()[live])) if layer in per_unit_mi else None
                points[layer] = (res.values.cpu()[live], values[live])
                if r == r:
                    rho_sel[layer] = r
                else:
                    raise ValueError(f"every live unit has the same {self.importance_by} (or the same selectivity), so their "
                                     "rank correlation is undefined; importance_by='loss_rise' is continuous")
                if r_mi is not None and r_mi == r_mi:
                    rho_mi[layer] = r_mi
            except ValueError as err:
                self._warn_skip(layer, "importance", err, ("importance_selectivity_rho", "importance_mi_rho"))
        return rho_sel, rho_mi, points


class RelianceMonitor(NetprobeMonitor):
    """Single-direction reliance (Morcos et al. 2018): the cumulative ablation curve of each
    monitored layer on the probe set, every epoch, and its normalized area (higher = less reliance).

    Logs ``netprobe/reliance_auc/<layer>`` and ``netprobe/reliance_auc``, the unnormalized area
    ``netprobe/reliance_area[/<layer>]`` (the same area times the unablated accuracy: it does not
    reward an underfit network for having little to lose); with ``noise=True`` also
    ``netprobe/noise_auc[/<layer>]``; ``netprobe/probe_accuracy``, the unablated accuracy on the
    probe set (the curves' starting point); with a TensorBoardLogger and matplotlib, the curves as
    a figure (``netprobe/reliance_curves``, ``netprobe/noise_curves``).

    Compare reliance between networks (or epochs) that fit the probe set about equally well: the
    AUC is normalized by the unablated accuracy, so an underfit network, which has little to lose,
    scores high. Early in training, or for a configuration that never fits its training data, read
    ``netprobe/probe_accuracy`` beside it (``netprobe rank --where`` filters runs on it, and
    :class:`~netprobe.lightning.RelianceEarlyStopping` has ``warmup_epochs``).

    Why the training set with the training labels (the default probe set): reliance predicts
    generalization *from the training data*. On held-out data a memorizing network is near chance
    before any ablation, its normalized curve is flat, and the signal inverts.

    **Common random numbers** (``orders="fixed"``, the default): the random unit orders of each
    layer (and, with ``noise=True``, its noise draws) are drawn once per run from ``seed`` and the
    layer's name, kept in the callback's ``state_dict`` (a resumed run and every DDP rank use the
    same ones) and reused at every measurement, like the probe set itself. The change of
    ``reliance_auc`` from one epoch to the next then reflects the network, not a new draw; on a
    frozen network it is exactly 0. ``orders="per_epoch"`` draws new orders at every measurement
    (from ``seed`` and the epoch): the values of a run then scatter by the order noise, but
    averaging a run's values over epochs averages over many orders, which ``"fixed"`` cannot do.
    Use ``"fixed"`` to compare epochs (early stopping, the trend of one run) and, for comparing
    runs of a sweep, either, knowing that with ``"fixed"`` each run keeps one draw's offset
    (the "sd over orders" of the README's precision table).

    **Defaults** (``num_samples=256`` probe examples, ``repeats=3`` orders, 5 ``fractions`` 0,
    0.25, ..., 1, fixed orders) were chosen from ``benchmarks/reliance_precision.py`` (the README's
    "Reliance defaults" table): about a quarter of the arithmetic of the paper's 11 fractions on
    512 examples, an sd over orders and probe sets together no larger, and an epoch-to-epoch
    change about 3.5x less noisy. Fewer fractions lower the AUC by a near-constant amount (the
    trapezoid is coarser): compare values measured with the same settings. The probe set is the one
    the other monitors share (same default size and seed), so one forward pass serves them all.

    Cost per measurement and layer: ``repeats x (len(fractions) - 2)`` forward passes of the layers
    after the monitored one over the probe set (stacked into large batches, the layers before it
    run once; fraction 1 is one mask for every order, and the unablated point comes from the
    forward pass over the probe set that the monitors share).

    Args:
        layers: see the base.
        fractions: as in :func:`netprobe.metrics.ablation_curve` (a selectivity order is computed over the
            whole probe set, across ranks).
        order: as in :func:`netprobe.metrics.ablation_curve` (a selectivity order is computed over the
            whole probe set, across ranks).
        mode: as in :func:`netprobe.metrics.ablation_curve` (a selectivity order is computed over the
            whole probe set, across ranks).
        repeats: as in :func:`netprobe.metrics.ablation_curve` (a selectivity order is computed over the
            whole probe set, across ranks).
        orders: ``"fixed"`` (common random numbers, the default) or ``"per_epoch"``; see above.
        noise: also compute the noise-robustness curve (``scales``).
        figures: log the curves as a figure to TensorBoard.
        max_batch: bound the rows and the elements of any module output in a stacked forward pass
            (as in :func:`~netprobe.metrics.ablation_curve`; the default keeps each module output
            under 1 MiB of float32 on the CPU, 8 MiB on a GPU).
        max_elements: bound the rows and the elements of any module output in a stacked forward pass
            (as in :func:`~netprobe.metrics.ablation_curve`; the default keeps each module output
            under 1 MiB of float32 on the CPU, 8 MiB on a GPU).
        **kwargs: see the base.

    Example:
        >>> RelianceMonitor(layers=["fc1", "fc2"]).metrics
        ('reliance_auc', 'reliance_area', 'probe_accuracy')
    """

    def __init__(
        self,
        layers: Any,
        *,
        fractions: Sequence[float] = RELIANCE_FRACTIONS,
        order: str = "random",
        mode: str = "zero",
        repeats: int = 3,
        orders: str = "fixed",
        noise: bool = False,
        scales: Sequence[float] = DEFAULT_SCALES,
        figures: bool = True,
        max_batch: int = 4096,
        max_elements: MaxElements = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(layers, **kwargs)
        if order not in ("random", "selectivity_desc", "selectivity_asc"):
            raise ValueError(f"Expected `order` to be 'random', 'selectivity_desc' or 'selectivity_asc', but got {order!r}.")
        if orders not in ("fixed", "per_epoch"):
            raise ValueError(f"Expected `orders` to be 'fixed' or 'per_epoch', but got {orders!r}.")
        if mode not in ("zero", "mean"):
            raise ValueError(f"Expected `mode` to be 'zero' or 'mean', but got {mode!r}.")
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"Expected `repeats` to be an int >= 1, but got {repeats!r}.")
        _check_budget(max_batch, max_elements)
        fr = _check_points(fractions, "fractions", 0.0, 1.0).tolist()  # the curves' own checks, now
        sc = _check_points(scales, "scales", 0.0, None).tolist()
        self.fractions, self.order, self.mode, self.repeats, self.orders = fr, order, mode, repeats, orders
        self.noise, self.scales, self.figures = bool(noise), sc, bool(figures)
        self.max_batch, self.max_elements = max_batch, max_elements
        self._orders: Dict[str, torch.Tensor] = {}  # fixed orders: layer -> (repeats, d)
        self.metrics = ("reliance_auc", "reliance_area") + (("noise_auc",) if noise else ()) + ("probe_accuracy",)

    def _check(self, widths: Mapping[str, int], n: int, acts: Mapping[str, torch.Tensor], out: Optional[torch.Tensor]) -> None:
        _check_class_scores("RelianceMonitor", self, out)

    def _validate(self, pl_module: nn.Module) -> None:
        super()._validate(pl_module)
        # a layer ablation cannot handle (a tuple output without `select`, a layout it cannot
        # establish) fails now, not after the first epoch: one curve per layer, one order, one batch
        assert self._probe is not None
        x, y = self._probe
        fwd = _ForwardAdapter(self, pl_module)
        for layer in self.layers:
            try:
                # on the probe set in one batch: its size is the batch size the layers see in the curves
                ablation_curve(fwd, f"module.{layer}", [(x[: self.batch_size], y[: self.batch_size])], fractions=self.fractions,
                               repeats=1, layout=self._per_layer(self.layout, layer), select=self._per_layer(self.select, layer),
                                    observe=self._layout_decisions)
            except (ValueError, TypeError) as err:
                raise type(err)(f"RelianceMonitor: layer {layer!r} cannot be ablated: {err}") from err

    def _reset_extra_state(self) -> None:
        self._orders = {}

    def _extra_state(self) -> Dict[str, Any]:
        return {"orders": {k: v.clone() for k, v in self._orders.items()}}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._orders = {k: v.long() for k, v in dict(state.get("orders", {})).items()}

    def _generator(self, layer: str, salt: int, epoch: Optional[int]) -> torch.Generator:
        """Seeded from ``seed`` and the layer's name (and the epoch with ``orders="per_epoch"``)."""
        key = zlib.crc32(layer.encode()) + salt * 7_919 + (0 if epoch is None else (epoch + 1) * 1_000_003)
        return torch.Generator().manual_seed((self.seed * 2_654_435_761 + key) % (2**63 - 1))

    def _random_orders(self, layer: str, epoch: int) -> torch.Tensor:
        """``(repeats, d)`` random unit orders of ``layer``: drawn once and kept (``"fixed"``), or per epoch."""
        d = self._widths[layer]
        kept = self._orders.get(layer) if self.orders == "fixed" else None
        if kept is not None and tuple(kept.shape) == (self.repeats, d):
            return kept
        if kept is not None:  # a resumed run with other settings (repeats) or another model's state
            warnings.warn(
                f"RelianceMonitor: the kept orders of layer {layer!r} have shape {tuple(kept.shape)}, but repeats={self.repeats} "
                f"and the layer has {d} units: drawing new ones (the values are not comparable with the earlier ones).",
                RuntimeWarning, stacklevel=2,
            )
        g = self._generator(layer, 0, None if self.orders == "fixed" else epoch)
        perms = torch.stack([torch.randperm(d, generator=g) for _ in range(self.repeats)])
        if self.orders == "fixed":
            self._orders[layer] = perms
        return perms

    def compute(self, trainer: Any, pl_module: nn.Module) -> Tuple[Dict[str, float], Dict[str, Any]]:
        x, y, sl = self._shard()
        epoch = int(trainer.current_epoch)
        data = self._batched(x, y)
        acts, out = self._probe_pass(trainer, pl_module, x)
        assert out is not None  # checked before the first step (_check)
        base = self._agreed(lambda: score(out, y.to(out.device)), out.device)  # this shard's unablated point
        total = _dist.all_reduce_sum(torch.tensor([base[0], float(x.shape[0])], dtype=torch.float64, device=out.device)).cpu()
        orders: Dict[str, Any] = {}
        for n in self.layers:
            if self.order == "random":
                orders[n] = self._random_orders(n, epoch)
                continue
            try:
                orders[n] = selectivity_order(_probe_selectivity(self, acts[n], y).values, descending=self.order == "selectivity_desc")
            except ValueError as err:  # e.g. negative activations: no selectivity, so no such order
                orders[n] = None
                self._warn_skip(n, "reliance (selectivity order)", err)
        fwd = _ForwardAdapter(self, pl_module)
        aucs, noise_aucs, curves, ncurves = {}, {}, {}, {}
        diverged = False
        for layer in self.layers:
            if orders[layer] is None:
                continue
            try:
                where = dict(layout=self._per_layer(self.layout, layer), select=self._per_layer(self.select, layer),
                                    observe=self._layout_decisions)
                c = ablation_curve(
                    fwd, f"module.{layer}", data, fractions=self.fractions, order=orders[layer], mode=self.mode,
                    max_batch=self.max_batch, max_elements=self.max_elements, distributed=True, unablated=base, **where,
                )
                aucs[layer], curves[layer] = float(c.auc), c
                if self.noise:
                    g = self._generator(layer, 1, None if self.orders == "fixed" else epoch)
                    nc = noise_curve(fwd, f"module.{layer}", data, scales=self.scales, repeats=self.repeats, index_offset=sl.start,
                                     generator=g, max_batch=self.max_batch, max_elements=self.max_elements, distributed=True,
                                     **where)
                    noise_aucs[layer], ncurves[layer] = float(nc.auc), nc
            except NonFiniteError as err:
                diverged = True
                self._warn_skip(layer, "reliance", err)
            except ValueError as err:
                self._warn_skip(layer, "reliance", err)
        out_vals: Dict[str, float] = {}
        cover = not diverged  # diverged: every mean is NaN below (the skip warning says why), not a mean over fewer layers
        self._layer_values("reliance_auc", aucs, out_vals, coverage=cover)
        # the unnormalized area (= auc x unablated accuracy): does not reward a network for having
        # little to lose, as the normalized one does for an underfit network
        self._layer_values("reliance_area", {k: aucs[k] * float(curves[k].accuracy[0]) for k in aucs}, out_vals, coverage=cover)
        if self.noise:
            self._layer_values("noise_auc", noise_aucs, out_vals, coverage=cover)
        # the model's own accuracy on the probe set: the curves' unablated point
        out_vals["netprobe/probe_accuracy"] = float(total[0] / total[1])
        if diverged:
            # NaN, not a missing key: EarlyStopping (check_finite) stops, ModelCheckpoint scores it
            # worst, and `netprobe rank` sees that the run ended diverged
            for key in self.metrics:
                out_vals[f"netprobe/{key}"] = float("nan")
        figs: Dict[str, Any] = {}
        if self.figures and self._media_due and _dist.rank() == 0 and _has_tensorboard(trainer):
            figs["netprobe/reliance_curves"] = viz.curves_figure(curves, title=f"cumulative ablation, epoch {epoch}", xlabel="fraction of units ablated")
            if self.noise:
                figs["netprobe/noise_curves"] = viz.curves_figure(ncurves, title=f"noise robustness, epoch {epoch}", xlabel="noise std / unit std")
        return out_vals, {"figures": figs}


class _ForwardAdapter(nn.Module):
    """Lets the metric functions call the monitor's ``forward(pl_module, x)``; the monitored
    layers are reached as ``module.<name>``."""

    def __init__(self, monitor: NetprobeMonitor, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        object.__setattr__(self, "_monitor", monitor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._monitor.forward(self.module, x)  # type: ignore[attr-defined]


_METHODS = ("pwcca", "svcca", "cka", "procrustes", "rbf_cka", "cka_debiased")
# methods computed by their function from the whole probe set's activations (never streamed d x d
# moments): RBF CKA's n x n kernels; debiased CKA's unbiased HSIC, which needs per-row norms
_WHOLE_SET = ("rbf_cka", "cka_debiased")
# methods that also have an n x n (Gram) form, used for layers wider than 2/3 of the probe set
_GRAM_FORM = ("cka", "procrustes")


class ConvergenceMonitor(NetprobeMonitor):
    """How much each layer's representation still changes: similarity of this epoch's activations
    on the probe set to those of the previous measurement (``<method>_prev``; the previous epoch
    with ``every_n_epochs=1``, else ``every_n_epochs`` epochs earlier) and, optionally, to a reference
    model or checkpoint (``<method>_ref``), for ``methods`` among ``pwcca``, ``svcca``, ``cka``,
    ``procrustes`` (:func:`~netprobe.metrics.procrustes`, Ding et al. 2021), ``rbf_cka``
    (:func:`~netprobe.metrics.rbf_cka`, Gaussian kernels at the median distance) and
    ``cka_debiased`` (``linear_cka(debiased=True)``, the unbiased HSIC estimator).

    The default is linear CKA alone: it is defined for any width and probe size, and costs one
    pass over the probe activations plus ``O(d^2)`` (PWCCA and SVCCA add eigendecompositions:
    on the demo's two 128-unit layers ~2x the cost of CKA each, see the README's cost table) and
    PWCCA needs ``num_samples > 2 d``. Ask for ``methods=("pwcca", "svcca", "cka")`` to follow
    Morcos et al. / Raghu et al.; the methods then share each covariance's factorization, and the
    previous measurement's statistics are reused.

    Logs ``netprobe/<method>_prev/<layer>`` and the mean ``netprobe/<method>_prev`` (1 = the layer
    did not change up to the method's invariances), likewise ``*_ref``; with ``heatmap=True`` and a
    TensorBoardLogger, a layer-by-layer linear-CKA heatmap of the current epoch
    (``netprobe/cka_layers``). Lower layers typically converge first (Raghu et al. 2017).

    Memory: the previous measurement's activations of the whole probe set are kept, per layer
    ``num_samples x d x 4`` bytes (CPU), and saved in the callback's state for resuming; the
    similarity itself streams paired shards through :class:`~netprobe.metrics.SimilarityAccumulator`
    (``O(d^2)``) and reduces them across ranks. PWCCA needs ``num_samples > 2 d`` per layer (checked
    before training starts); SVCCA reduces to ``keep`` of the variance first.

    Args:
        layers: see the base.
        methods: one name or a sequence of names among ``"pwcca"``, ``"svcca"``, ``"cka"``,
            ``"procrustes"``, ``"rbf_cka"``, ``"cka_debiased"`` (default ``("cka",)``; ``"cka"`` is
            the same as ``("cka",)``). ``procrustes`` streams like the others (``O(d^2)``; for a
            layer wider than 2/3 of the probe set, with CKA alone or beside it, from ``n x n`` Gram
            matrices); ``rbf_cka`` takes ``n x n`` kernel matrices of the whole probe set (about
            ``24 n^2`` bytes at peak, ``n`` up to ``rbf_max_samples``: a larger probe set is refused
            before the first step); ``cka_debiased`` (``linear_cka(debiased=True)``: less upward
            bias than ``cka`` for a layer wide next to the probe set; needs 4 probe examples) is
            computed from the whole probe set's activations, and, being an unbiased estimate, can
            fall slightly below 0 for unrelated representations.
        reference: an ``nn.Module`` with the same layer names, or a checkpoint path whose
            ``state_dict`` loads into a copy of the LightningModule. Treated as fixed: its
            activations on the probe set are computed once, when training starts (a reference
            that changes during training, e.g. an EMA copy, is compared as that snapshot).
        keep: SVCCA's variance fraction (or int number of directions).
        heatmap: log the layer-by-layer CKA heatmap.
        rbf_threshold: ``rbf_cka``'s kernel bandwidth as a multiple of the median distance (the
            ``threshold`` of :func:`~netprobe.metrics.rbf_cka`; positive, default 1.0; Kornblith et
            al. use 0.2 to 1.0).
        rbf_max_samples: the largest probe set ``rbf_cka`` accepts (the ``max_samples`` of
            :func:`~netprobe.metrics.rbf_cka`, default 10000, about 2.4 GB at peak); a larger probe set
            is refused before the first step. Raise it if the memory is there.
        **kwargs: see the base.

    Example:
        >>> ConvergenceMonitor(layers=["relu1"]).metrics
        ('cka_prev',)
        >>> ConvergenceMonitor(layers=["relu1"], methods=("pwcca", "cka")).metrics
        ('pwcca_prev', 'cka_prev')
        >>> ConvergenceMonitor(layers=["relu1"], methods="cka_debiased").metrics
        ('cka_debiased_prev',)
    """

    def __init__(
        self,
        layers: Any,
        *,
        methods: Sequence[str] = ("cka",),
        reference: Optional[Union[nn.Module, str]] = None,
        keep: Union[float, int] = 0.99,
        heatmap: bool = False,
        rbf_threshold: float = 1.0,
        rbf_max_samples: int = RBF_MAX_SAMPLES,
        **kwargs: Any,
    ) -> None:
        super().__init__(layers, **kwargs)
        if isinstance(methods, str):  # one name, as SimilarityAccumulator.compute takes it (not its letters)
            methods = (methods,)
        try:
            methods = tuple(dict.fromkeys(methods))  # unique, in the order given
        except TypeError:
            raise TypeError(f"Expected `methods` to be a method name or a sequence of names, but got {methods!r}.") from None
        bad = [m for m in methods if m not in _METHODS]
        if not methods or bad:
            raise ValueError(f"Expected `methods` to be one name or a sequence of names among {list(_METHODS)}, but got {list(methods)}.")
        if isinstance(rbf_threshold, bool) or not isinstance(rbf_threshold, (int, float)) or not 0.0 < float(rbf_threshold) < float("inf"):
            raise ValueError(
                "Expected `rbf_threshold` to be a positive finite number (rbf_cka's bandwidth as a multiple of the median "
                f"distance; Kornblith et al. use 0.2 to 1.0), but got {rbf_threshold!r}."
            )
        if isinstance(rbf_max_samples, bool) or not isinstance(rbf_max_samples, int) or rbf_max_samples < 4:
            raise ValueError(f"Expected `rbf_max_samples` to be an int >= 4, but got {rbf_max_samples!r}.")
        self.rbf_threshold, self.rbf_max_samples = float(rbf_threshold), rbf_max_samples
        if reference is not None and not isinstance(reference, (nn.Module, str)):
            raise TypeError(f"Expected `reference` to be an nn.Module or a checkpoint path, but got {type(reference).__name__}.")
        _check_keep(keep)  # here, not at every epoch's SVCCA
        self.methods, self.reference, self.keep, self.heatmap = methods, reference, keep, bool(heatmap)
        self._prev: Dict[str, torch.Tensor] = {}
        self._ref: Dict[str, torch.Tensor] = {}
        # the statistics and factorizations of those activations, computed when they were compared
        # last: reused, not recomputed (derived from _prev/_ref, so not part of the saved state)
        self._prev_side: Dict[str, SideStats] = {}
        self._ref_side: Dict[str, SideStats] = {}
        self.metrics = tuple(f"{m}_prev" for m in methods) + (tuple(f"{m}_ref" for m in methods) if reference is not None else ())

    def _rbf_too_many(self, n: int) -> str:
        """Why a probe set of ``n`` examples is too large for ``rbf_cka``, naming the fixes."""
        fewer = ("pass fewer `probe_data` rows" if isinstance(self.probe_data, (tuple, list))
                 else f"lower `num_samples` to {self.rbf_max_samples} or fewer")
        return (
            f"ConvergenceMonitor: expected at most `rbf_max_samples`={self.rbf_max_samples} probe examples for rbf_cka, whose "
            f"n x n kernel matrices of the whole probe set take about 24 n^2 bytes at peak ({24 * n * n / 2**30:.1f} GiB "
            f"for n={n}), but the probe set has n={n}. {fewer[0].upper() + fewer[1:]}, or pass `rbf_max_samples={n}` "
            "if the memory is there, or leave 'rbf_cka' out of `methods`."
        )

    def _check(self, widths: Mapping[str, int], n: int, acts: Mapping[str, torch.Tensor], out: Optional[torch.Tensor]) -> None:
        if "rbf_cka" in self.methods and n > self.rbf_max_samples:
            raise ValueError(self._rbf_too_many(n))
        if "cka_debiased" in self.methods and n < 4:
            raise ValueError(
                f"ConvergenceMonitor: expected at least 4 probe examples for cka_debiased (the unbiased HSIC estimator), "
                f"but the probe set has n={n}. Use num_samples >= 4 (or more `probe_data` rows), or methods=('cka',)."
            )
        if "pwcca" in self.methods:
            small = {k: d for k, d in widths.items() if 2 * d >= n}
            if small:
                raise ValueError(
                    f"ConvergenceMonitor: PWCCA compares a layer with itself at another epoch, so it needs more probe "
                    f"samples than twice the layer's units, but the probe set has n={n} and layers {small} have "
                    f"n/2 units or more. Use num_samples > {2 * max(small.values())} (several times that is safer), "
                    "or methods=('cka',), or ('svcca', 'cka') with an int `keep` below n/2."
                )

    def _validate(self, pl_module: nn.Module) -> None:
        super()._validate(pl_module)
        if self.reference is not None:  # a missing checkpoint or mismatched layers fail now, not after an epoch
            self._reference_acts(pl_module)

    def _reset_extra_state(self) -> None:
        self._prev, self._ref, self._prev_side, self._ref_side = {}, {}, {}, {}

    def _extra_state(self) -> Dict[str, Any]:
        return {"prev": {k: v.clone() for k, v in self._prev.items()}}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._prev, self._prev_side = dict(state.get("prev", {})), {}

    def _whole_set(self, method: str, cur_full: torch.Tensor, other_full: torch.Tensor) -> torch.Tensor:
        """A method of :data:`_WHOLE_SET`, by its function, on the whole probe set's activations."""
        if method == "cka_debiased":
            return linear_cka(cur_full, other_full, debiased=True)
        if cur_full.shape[0] > self.rbf_max_samples:  # refused before the first step; named by the monitor's options
            raise ValueError(self._rbf_too_many(cur_full.shape[0]))
        return rbf_cka(cur_full, other_full, threshold=self.rbf_threshold, max_samples=self.rbf_max_samples)

    def _similarities(self, cur: torch.Tensor, other_full: torch.Tensor, sl: slice, layer: str, what: str,
                      other_side: Optional[SideStats], cur_full: torch.Tensor, key: str
                      ) -> Tuple[Dict[str, float], Optional[SimilarityAccumulator]]:
        """The methods' values for this rank's shard ``cur`` against the same rows of ``other_full``
        (reduced across ranks), each covariance factorized once; ``other_side``: the other side's
        statistics from an earlier comparison, reused instead of recomputed. A layer wider than
        2/3 of the probe set with CKA alone takes the exact linear CKA from the ``n x n`` Gram
        matrices of the whole probe set (``cur_full``, every rank alike) instead of ``d x d``
        moments: the same value, ``O(n^2)`` memory and ``n^2 d`` work instead of ``O(d^2)`` and
        ``n d^2`` (returns no accumulator then). ``key``: ``"prev"`` or ``"ref"``, the logged
        metrics' suffix."""
        n, d = cur_full.shape[0], cur_full.shape[1]
        out: Dict[str, float] = {}
        for m in self.methods:
            if m in _WHOLE_SET:  # the whole probe set on every rank: the same value everywhere
                try:
                    out[m] = float(self._whole_set(m, cur_full, other_full))
                except ValueError as err:
                    self._warn_skip(layer, f"{m} ({what})", err, (f"{m}_{key}",))
        streamed = [m for m in self.methods if m not in _WHOLE_SET]
        if not streamed:
            return out, None
        if all(m in _GRAM_FORM for m in streamed) and 3 * d > 2 * n:
            for m in streamed:
                fn = linear_cka if m == "cka" else procrustes
                out[m] = float(fn(cur_full, other_full))
            return out, None
        other = other_full[sl].to(cur.device)
        acc = self._agreed(lambda: SimilarityAccumulator().update(cur, other, y_stats=other_side), cur.device).all_reduce()
        # after the reduce every rank holds the same moments: same outcome everywhere
        values, errors = acc.compute(streamed, keep=self.keep)
        for m, err in errors.items():  # e.g. SVCCA keeping more directions than the samples allow
            self._warn_skip(layer, f"{m} ({what})", err, (f"{m}_{key}",))
        out.update({m: float(v) for m, v in values.items()})
        return out, acc

    def _reference_acts(self, pl_module: nn.Module) -> Dict[str, torch.Tensor]:
        if not self._ref and self.reference is not None:
            ref = self.reference
            if isinstance(ref, str):
                path = ref

                def load() -> nn.Module:
                    model = copy.deepcopy(pl_module)
                    try:
                        ckpt = torch.load(path, map_location="cpu", weights_only=False)
                    except Exception as err:  # a missing, truncated or foreign file: pickle, EOF, zip errors
                        raise ValueError(
                            f"ConvergenceMonitor: cannot load the reference checkpoint {path!r} ({type(err).__name__}: {err}). "
                            "Pass the path of a Lightning checkpoint or of a saved state_dict, or an nn.Module."
                        ) from err
                    if isinstance(ckpt, nn.Module):  # a whole saved model
                        ckpt = ckpt.state_dict()
                    if not isinstance(ckpt, Mapping):
                        raise ValueError(
                            f"ConvergenceMonitor: the reference checkpoint {path!r} holds a {type(ckpt).__name__}, not a "
                            "state_dict or a Lightning checkpoint (a dict with 'state_dict')."
                        )
                    try:
                        model.load_state_dict(ckpt.get("state_dict", ckpt))
                    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
                        raise ValueError(f"ConvergenceMonitor: cannot load the reference checkpoint {path!r}: {err}") from err
                    return model

                # agreed across ranks: one rank failing to read the file must not leave the others waiting
                ref = self._agreed(load, next((p.device for p in pl_module.parameters()), None))
            x, _, _ = self._shard()
            with evaluating(ref, restore_rng=True):
                acts, _ = self._capture(ref, x)
            self._ref = {k: _dist.all_gather_cat(v).cpu().float() for k, v in acts.items()}
        return self._ref

    def compute(self, trainer: Any, pl_module: nn.Module) -> Tuple[Dict[str, float], Dict[str, Any]]:
        x, _, sl = self._shard()
        acts, _ = self._probe_pass(trainer, pl_module, x)
        prev_vals: Dict[str, Dict[str, float]] = {m: {} for m in self.methods}
        ref_vals: Dict[str, Dict[str, float]] = {m: {} for m in self.methods}
        ref = self._reference_acts(pl_module) if self.reference is not None else {}
        sides: Dict[str, SideStats] = {}
        full = {k: _dist.all_gather_cat(v).cpu().float() for k, v in acts.items()}  # the whole probe set, every rank
        # the layers that should have a value this time (the means' coverage): a first measurement has no previous one
        prev_expected, ref_expected = [k for k in acts if k in self._prev], [k for k in acts if k in ref]
        for layer, a in acts.items():
            try:
                if layer in self._prev:
                    vals, acc = self._similarities(a, self._prev[layer], sl, layer, "to the previous measurement",
                                                   self._prev_side.get(layer), full[layer], "prev")
                    for m, v in vals.items():
                        prev_vals[m][layer] = v
                    if acc is not None:
                        sides[layer] = acc.side("x")  # this epoch's side: the previous one at the next measurement
                if layer in ref:
                    vals, acc = self._similarities(a, ref[layer], sl, layer, "to the reference", self._ref_side.get(layer),
                                                   full[layer], "ref")
                    for m, v in vals.items():
                        ref_vals[m][layer] = v
                    if acc is not None:
                        self._ref_side[layer] = acc.side("y")
            except ValueError as err:
                self._warn_skip(layer, "similarity", err)
        self._prev, self._prev_side = full, sides
        out: Dict[str, float] = {}
        for m in self.methods:
            self._layer_values(f"{m}_prev", prev_vals[m], out, expected=prev_expected)
            if self.reference is not None:
                self._layer_values(f"{m}_ref", ref_vals[m], out, expected=ref_expected)
        figs: Dict[str, Any] = {}
        if self.heatmap and self._media_due and _dist.rank() == 0 and _has_tensorboard(trainer) and len(full) > 1:
            sm = similarity_matrix(full, method="cka")  # each layer's statistics computed once
            figs["netprobe/cka_layers"] = viz.heatmap_figure(sm.values, list(sm.labels),
                                                             title=f"linear CKA between layers, epoch {trainer.current_epoch}")
        return out, {"figures": figs}


def _has_tensorboard(trainer: Any) -> bool:
    return any(type(lg).__name__ == "TensorBoardLogger" for lg in (getattr(trainer, "loggers", None) or []))
