"""``RelianceMonitor``: single-direction reliance (cumulative ablation and noise curves and their
normalized areas, Morcos et al. 2018) on the probe set, each epoch. Composes
:mod:`netprobe.metrics`; re-implements none."""

from __future__ import annotations

import warnings
import zlib
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe import viz
from netprobe._validation import check_choice, check_int
from netprobe.lightning._shared import _check_class_scores, _ForwardAdapter, _probe_selectivity
from netprobe.lightning._tensorboard import _has_tensorboard
from netprobe.lightning.base import Layers, LayoutSpec, NetprobeMonitor, ProbeData, SelectSpec
from netprobe.metrics.reliance import (
    DEFAULT_SCALES,
    MaxElements,
    NonFiniteError,
    ablation_curve,
    noise_curve,
    score,
    selectivity_order,
)
from netprobe.metrics.reliance._inputs import _check_budget, _check_points

if TYPE_CHECKING:  # pragma: no cover
    from netprobe.lightning._shared_pass import Trainer

__all__ = ["RelianceMonitor", "RELIANCE_FRACTIONS"]


#: RelianceMonitor's default ablated fractions (5 points; the paper's 11 are ablation_curve's
#: default); docs/reliance.md gives the precision and cost they were chosen from
RELIANCE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


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
    0.25, ..., 1, fixed orders) were chosen from ``benchmarks/reliance_precision.py`` for their
    precision per cost (docs/reliance.md). Fewer fractions lower the AUC by a near-constant amount
    (the trapezoid is coarser): compare values measured with the same settings. The probe set is the one
    the other monitors share (same default size and seed), so one forward pass serves them all.

    Cost per measurement and layer: ``repeats x (len(fractions) - 2)`` forward passes of the layers
    after the monitored one over the probe set (stacked into large batches, the layers before it
    run once; fraction 1 is one mask for every order, and the unablated point comes from the
    forward pass over the probe set that the monitors share).

    **A bounded cost on a big model** (``layers_per_measurement=k``): each measurement ablates the
    next ``k`` layers of a fixed rotation (``layers`` in their resolved order, cut into
    ``ceil(L / k)`` groups of ``k``, the last one shorter), so a measurement costs one group's
    curves and each layer is measured every ``ceil(L / k)`` measurements, with the precision it has
    without rotation (same probe set, same orders). A layer's keys are logged when it is measured
    and keep their last value where Lightning's callbacks read them in between, as with
    ``every_n_epochs``; the means over layers (``netprobe/reliance_auc``, ...) are logged once per
    rotation, at its last group, over the values of that rotation (each layer's from the epoch it
    was measured), so they compare like with like; ``probe_accuracy`` at every measurement. The
    position in the rotation and its values so far are in the callback's state (a resumed run
    goes on where it was).

    The shared options, keyword-only, are those of :class:`~netprobe.lightning.base.NetprobeMonitor`,
    which documents them: ``num_samples``, ``every_n_epochs``, ``probe_data``, ``batch_size``,
    ``seed``, ``num_classes``, ``media_every``, ``layout``, ``select``.

    Args:
        layers: see :class:`~netprobe.lightning.base.NetprobeMonitor`.
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
        layers_per_measurement: ablate this many layers per measurement, in rotation (see above);
            ``None`` (default): every layer at every measurement.

    Example:
        >>> RelianceMonitor(layers=["fc1", "fc2"]).metrics
        ('reliance_auc', 'reliance_area', 'probe_accuracy')
    """

    def __init__(
        self,
        layers: Layers,
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
        layers_per_measurement: Optional[int] = None,
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
        check_choice(order, "order", ("random", "selectivity_desc", "selectivity_asc"))
        check_choice(orders, "orders", ("fixed", "per_epoch"))
        check_choice(mode, "mode", ("zero", "mean"))
        check_int(repeats, "repeats", 1)
        _check_budget(max_batch, max_elements)
        fr = _check_points(fractions, "fractions", 0.0, 1.0).tolist()  # the curves' own checks, now
        sc = _check_points(scales, "scales", 0.0, None).tolist()
        self.fractions, self.order, self.mode, self.repeats, self.orders = fr, order, mode, repeats, orders
        self.noise, self.scales, self.figures = bool(noise), sc, bool(figures)
        self.max_batch, self.max_elements = max_batch, max_elements
        if layers_per_measurement is not None:
            check_int(layers_per_measurement, "layers_per_measurement", 1)
        self.layers_per_measurement = layers_per_measurement
        self._orders: Dict[str, torch.Tensor] = {}  # fixed orders: layer -> (repeats, d)
        # the rotation (layers_per_measurement): measurements made, and this rotation's values so far
        self._rotation = 0
        self._rotation_values: Dict[str, Dict[str, float]] = {}
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
        self._orders, self._rotation, self._rotation_values = {}, 0, {}

    def _extra_state(self) -> Dict[str, Any]:
        return {"orders": {k: v.clone() for k, v in self._orders.items()},
                "rotation": {"measurements": self._rotation, "values": {m: dict(v) for m, v in self._rotation_values.items()}}}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._orders = {k: v.long() for k, v in dict(state.get("orders", {})).items()}
        rot = dict(state.get("rotation", {}))
        self._rotation = int(rot.get("measurements", 0))
        self._rotation_values = {str(m): {str(k): float(x) for k, x in dict(v).items()} for m, v in dict(rot.get("values", {})).items()}

    def _late_keys(self, pl_module: nn.Module) -> Dict[str, str]:
        late = super()._late_keys(pl_module)
        groups = self._groups() if self.layers else []
        if self.layers_per_measurement is None or len(groups) < 2 or late:
            return late
        why = (f"layers_per_measurement={self.layers_per_measurement}: the means first at the end of epoch {len(groups) - 1}, "
               "a layer at the epoch its group is measured")
        rotating = [m for m in self.metrics if m != "probe_accuracy"]
        keys = {f"netprobe/{m}" for m in rotating} | {f"netprobe/best/{m}" for m in rotating}
        keys |= {f"netprobe/{m}/{layer}" for m in rotating for layer in self.layers if layer not in groups[0]}
        return {k: why for k in keys}

    def _groups(self) -> List[List[str]]:
        """The rotation's groups of layers (one group of all of them without ``layers_per_measurement``)."""
        k = self.layers_per_measurement or len(self.layers)
        return [list(self.layers[i : i + k]) for i in range(0, len(self.layers), max(k, 1))]

    def _rotate(self, values: Dict[str, Dict[str, float]], due: Sequence[str], out: Dict[str, float], *,
                coverage: bool) -> None:
        """With ``layers_per_measurement``: keep this group's values for the rotation's means, log
        those means at its last group (over the rotation's values, then start a new one; with
        ``coverage``, noting which of the layers they cover, for the measurement's warnings), and
        name the keys left at their last value (the means before then, the layers not due)."""
        groups = self._groups()
        last = self._rotation % len(groups) == len(groups) - 1
        self._rotation += 1
        resting = {f"netprobe/{m}/{layer}" for m in values for layer in self.layers if layer not in due}
        for metric, vals in values.items():
            self._rotation_values.setdefault(metric, {}).update(vals)
            mean_key = f"netprobe/{metric}"
            out.pop(mean_key, None)
            if not last:
                resting.add(mean_key)
                continue
            # the rotation's mean (and coverage) as every mean over layers is formed; its per-layer
            # keys, of earlier epochs, are not logged again
            whole: Dict[str, float] = {}
            self._layer_values(metric, self._rotation_values[metric], whole, coverage=coverage)
            if mean_key in whole:
                out[mean_key] = whole[mean_key]
        if last:
            self._rotation_values = {}
        self._resting = resting

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

    def compute(self, trainer: Trainer, pl_module: nn.Module) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """This measurement's reliance values (``reliance_auc``, ``reliance_area``, ``noise_auc``, ``probe_accuracy``) per layer and their means, and the curves' figures when media are due."""
        x, y, sl = self._shard()
        epoch = int(trainer.current_epoch)
        data = self._batched(x, y)
        acts, out = self._probe_pass(trainer, pl_module, x)
        assert out is not None  # checked before the first step (_check)
        base = self._agreed(lambda: score(out, y.to(out.device)), out.device)  # this shard's unablated point
        total = _dist.all_reduce_sum(torch.tensor([base[0], float(x.shape[0])], dtype=torch.float64, device=out.device)).cpu()
        groups = self._groups()
        # every layer, or this measurement's group of the rotation (the last one's again when its media are redrawn)
        due = groups[(self._rotation - int(self._redrawing)) % len(groups)]
        orders: Dict[str, Any] = {}
        for n in due:
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
        for layer in due:
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
        areas = {k: aucs[k] * float(curves[k].accuracy[0]) for k in aucs}
        rotating = self.layers_per_measurement is not None
        # with the rotation, a mean's coverage is the rotation's, noted at its last group (_rotate)
        each = cover and not rotating
        self._layer_values("reliance_auc", aucs, out_vals, expected=due, coverage=each)
        # the unnormalized area (= auc x unablated accuracy): does not reward a network for having
        # little to lose, as the normalized one does for an underfit network
        self._layer_values("reliance_area", areas, out_vals, expected=due, coverage=each)
        if self.noise:
            self._layer_values("noise_auc", noise_aucs, out_vals, expected=due, coverage=each)
        if self._redrawing:
            pass  # the last measurement again, for its media: the rotation does not move
        elif rotating:
            self._rotate({"reliance_auc": aucs, "reliance_area": areas, **({"noise_auc": noise_aucs} if self.noise else {})},
                         due, out_vals, coverage=cover)
        else:
            self._resting = set()
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
