"""``SelectivityMonitor``: class selectivity, dead units, per-unit mutual information and unit
importance on the probe set, each epoch. Composes :mod:`netprobe.metrics`; re-implements none."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe import viz
from netprobe._validation import check_choice, check_finite
from netprobe.lightning._shared import _SELECTIVITY_SKIP, _check_class_scores, _ForwardAdapter, _probe_selectivity
from netprobe.lightning._tensorboard import _has_tensorboard
from netprobe.lightning.base import Layers, LayoutSpec, NetprobeMonitor, ProbeData, SelectSpec
from netprobe.metrics.information import MutualInfoAccumulator, quantile_edges
from netprobe.metrics.reliance import score, spearman, unit_importance
from netprobe.metrics.selectivity import SelectivityResult

if TYPE_CHECKING:  # pragma: no cover
    from netprobe.lightning._shared_pass import Trainer

__all__ = ["SelectivityMonitor"]


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

    The shared options, keyword-only, are those of :class:`~netprobe.lightning.base.NetprobeMonitor`,
    which documents them: ``num_samples``, ``every_n_epochs``, ``probe_data``, ``batch_size``,
    ``seed``, ``num_classes``, ``media_every``, ``layout``, ``select``.

    Args:
        layers: see :class:`~netprobe.lightning.base.NetprobeMonitor`.
        mutual_info: also log per-unit mutual information with the label (equal-frequency bins).
        bins: bins for mutual information.
        histograms: log the per-unit histogram to TensorBoard.
        importance: also measure single-unit importance and its rank correlations (see above).
        importance_by: ``"loss_rise"`` (default) or ``"accuracy_drop"``.
        importance_mode: ``"zero"`` (default) or ``"mean"`` ablation of the unit.

    Example:
        >>> SelectivityMonitor(layers=["relu1", "relu2"], mutual_info=True).metrics
        ('selectivity_mean', 'dead_fraction', 'mutual_info_mean')
        >>> SelectivityMonitor(layers=["relu1"], mutual_info=True, importance=True).metrics[-2:]
        ('importance_selectivity_rho', 'importance_mi_rho')
    """

    def __init__(
        self,
        layers: Layers,
        *,
        mutual_info: bool = False,
        bins: int = 16,
        histograms: bool = True,
        importance: bool = False,
        importance_by: str = "loss_rise",
        importance_mode: str = "zero",
        num_samples: int = 256,
        every_n_epochs: int = 1,
        probe_data: Optional[ProbeData] = None,
        batch_size: int = 256,
        seed: int = 0,
        num_classes: Optional[int] = None,
        media_every: int = 10,
        layout: LayoutSpec = None,
        select: SelectSpec = None,
    ) -> None:
        super().__init__(layers, num_samples=num_samples, every_n_epochs=every_n_epochs, probe_data=probe_data,
                         batch_size=batch_size, seed=seed, num_classes=num_classes, media_every=media_every,
                         layout=layout, select=select)
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"Expected `bins` to be an int >= 2, but got {bins!r}.")
        check_choice(importance_by, "importance_by", ("loss_rise", "accuracy_drop"))
        check_choice(importance_mode, "importance_mode", ("zero", "mean"))
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

    def compute(self, trainer: Trainer, pl_module: nn.Module) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """This measurement's selectivity values (``selectivity_mean``, ``dead_fraction``, optionally ``mutual_info_mean`` and the importance correlations) per layer and their means, and the histograms when media are due."""
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
