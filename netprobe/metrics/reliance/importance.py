"""Single-unit importance (Morcos et al. 2018, section 3.4): what each unit of a layer is worth alone.

For every unit ``u`` of a layer, the unit alone is ablated (set to 0, or to its mean over the
data) and the model's accuracy and mean loss on ``data`` are recorded:

    accuracy_drop[u] = accuracy(model) - accuracy(model with u ablated)
    loss_rise[u]     = loss(model with u ablated) - loss(model)

Morcos et al. compare this importance with the unit's class selectivity
(:func:`netprobe.metrics.class_selectivity`) and find selectivity a poor predictor of it;
:func:`spearman` gives the rank correlation on tensors (average ranks for ties).

Evaluation follows :func:`netprobe.metrics.ablation_curve` exactly (same module docstring caveats):
eval mode under ``torch.no_grad()``, the model left as found (training flags, parameters, hooks,
the global RNG), the ``d`` one-unit masks stacked ``m`` at a time in one forward pass within the
``max_batch``/``max_elements`` budget, the layer's layout decided by
:class:`netprobe.layers.Layouts` (``layout=``, ``select=`` for tuple outputs). Units are the
channels of conv outputs and the last axis of sequence outputs, as in the curves.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe._validation import check_choice
from netprobe.layers import check_layout, evaluating, resolve_layer
from netprobe.metrics.reliance._engine import _layer_pass, _mask_perturb, _PassOptions, _reduce_stats, _run
from netprobe.metrics.reliance._inputs import (
    Data,
    LossFn,
    MaxElements,
    NonFiniteError,
    Observe,
    _check_budget,
    _check_reiterable,
    _max_elements,
    _model_device,
)

__all__ = ["unit_importance", "ImportanceResult", "spearman"]

_F64 = torch.float64


@dataclass(frozen=True)
class ImportanceResult:
    """Per-unit single-ablation statistics of one layer, with their sufficient statistics.

    Attributes:
        correct: ``(d,)`` float64 number of correct predictions with unit ``u`` alone ablated.
        loss_sum: ``(d,)`` float64 summed per-sample loss with unit ``u`` alone ablated.
        base_correct: 0-d float64, correct predictions of the model itself (nothing ablated).
        base_loss_sum: 0-d float64, its summed per-sample loss.
        count: number of samples evaluated.
        layer: the qualified name of the layer.
        mode: ``"zero"`` or ``"mean"`` (how a unit was ablated).
    """

    correct: torch.Tensor
    loss_sum: torch.Tensor
    base_correct: torch.Tensor
    base_loss_sum: torch.Tensor
    count: int
    layer: str
    mode: str

    @property
    def num_units(self) -> int:
        """The number of units measured."""
        return int(self.correct.shape[0])

    @property
    def accuracy(self) -> torch.Tensor:
        """``(d,)`` accuracy with unit ``u`` alone ablated."""
        return self.correct / self.count

    @property
    def loss(self) -> torch.Tensor:
        """``(d,)`` mean per-sample loss with unit ``u`` alone ablated."""
        return self.loss_sum / self.count

    @property
    def base_accuracy(self) -> torch.Tensor:
        """0-d, the unablated accuracy."""
        return self.base_correct / self.count

    @property
    def base_loss(self) -> torch.Tensor:
        """0-d, the unablated mean per-sample loss."""
        return self.base_loss_sum / self.count

    @property
    def accuracy_drop(self) -> torch.Tensor:
        """``(d,)`` ``base_accuracy - accuracy``: positive when the unit matters (negative when
        ablating it happens to help). A multiple of ``1 / count``."""
        return (self.base_correct - self.correct) / self.count

    @property
    def loss_rise(self) -> torch.Tensor:
        """``(d,)`` ``loss - base_loss``: a finer-grained importance than the accuracy drop."""
        return (self.loss_sum - self.base_loss_sum) / self.count

    def all_reduce(self) -> "ImportanceResult":
        """Sum the statistics over ranks (each rank evaluated its shard of the data). A collective
        under torch.distributed; returns ``self`` otherwise."""
        if not _dist.is_distributed():
            return self
        d = self.num_units
        flat = torch.cat([self.correct, self.loss_sum, self.base_correct.reshape(1), self.base_loss_sum.reshape(1),
                          torch.tensor([float(self.count)], dtype=_F64, device=self.correct.device)])
        flat = _dist.all_reduce_sum(flat)
        return replace(self, correct=flat[:d], loss_sum=flat[d : 2 * d], base_correct=flat[2 * d], base_loss_sum=flat[2 * d + 1],
                       count=int(flat[-1]))


def _check_unablated(unablated: object) -> Optional[Tuple[float, float]]:
    if unablated is None:
        return None
    try:
        c, l = unablated  # type: ignore[misc]
        return float(c), float(l)
    except (TypeError, ValueError):
        raise TypeError(
            f"Expected `unablated` to be a (correct, loss_sum) pair of numbers (from `score(outputs, targets)`), but got {unablated!r}."
        ) from None


def _checked(res: ImportanceResult) -> ImportanceResult:
    if res.count == 0:
        raise ValueError(
            f"`data` holds no samples (its batches are empty), so the importance of layer {res.layer!r}'s units is "
            "undefined. Pass data with at least one sample."
        )
    if bool(torch.isnan(res.base_loss_sum)):
        raise NonFiniteError(
            "The loss is NaN on `data` before any ablation: the network's outputs are not finite (diverged "
            "training?), so its units' importance is undefined. Check the model, or pass a `loss_fn` that is finite here."
        )
    if not bool(torch.isfinite(res.loss_sum).all()) or not bool(torch.isfinite(res.base_loss_sum)):
        warnings.warn(
            f"The loss is not finite with some units of layer {res.layer!r} ablated (e.g. a normalization that divides "
            "by the units' norm, or -inf scores); `accuracy_drop` is unaffected, `loss_rise` has NaN/inf there.",
            RuntimeWarning,
            stacklevel=3,
        )
    return res


def unit_importance(
    model: nn.Module,
    layer: Union[str, nn.Module],
    data: Data,
    *,
    mode: str = "zero",
    loss_fn: Optional[LossFn] = None,
    max_batch: int = 4096,
    max_elements: MaxElements = "auto",
    vectorize: bool = True,
    distributed: bool = False,
    expand: str = "auto",
    unablated: Optional[Tuple[float, float]] = None,
    layout: Optional[str] = None,
    select: Union[int, str, None] = None,
    observe: Observe = True,
) -> ImportanceResult:
    """Importance of every unit of one layer: the accuracy drop and loss rise when it alone is ablated.

    ``d + 1`` evaluations over ``data`` (each unit ablated alone, and the model itself unless
    ``unablated`` is given), stacked as in :func:`netprobe.metrics.ablation_curve`: the cost is
    about that of an ablation curve with ``d`` points.

    Args:
        model: a classifier returning ``(batch, num_classes)`` scores.
        layer: qualified module name (``"encoder.relu2"``) or the submodule itself.
        data: an ``(inputs, targets)`` pair of tensors, or an iterable of such batches (a
            ``DataLoader``) that can be iterated more than once.
        mode: ``"zero"`` (set the unit to 0) or ``"mean"`` (to its mean over ``data``, and over
            positions for conv/sequence outputs), as in ``ablation_curve``.
        loss_fn: ``loss_fn(outputs, targets) -> (batch,)`` per-sample losses; default cross-entropy.
        max_batch: the budget and stacking of the forward passes, as in ``ablation_curve`` (same numbers
            whatever they are).
        max_elements: the budget and stacking of the forward passes, as in ``ablation_curve`` (same numbers
            whatever they are).
        vectorize: the budget and stacking of the forward passes, as in ``ablation_curve`` (same numbers
            whatever they are).
        expand: the budget and stacking of the forward passes, as in ``ablation_curve`` (same numbers
            whatever they are).
        distributed: ``data`` is this rank's shard: the per-unit means (``mode="mean"``) and the
            result are reduced across ranks of ``torch.distributed``, so every rank gets the
            importance over the whole data. Ignored when not distributed.
        unablated: ``(correct, loss_sum)`` of the model itself on exactly this ``data``
            (:func:`netprobe.metrics.ablation.score` of outputs the caller has anyway); the
            unablated pass is then skipped.
        layout: the layout of the layer's output (``"NC"``, ``"NCL"``, ``"NLC"``, ``"LNC"``,
            ``"NCHW"``, ...), where netprobe cannot establish it; see ``ablation_curve``.
        select: the int index or key of the tensor to ablate in a tuple/dict output (``nn.LSTM``:
            ``select=0``).
        observe: as in :func:`~netprobe.metrics.ablation_curve`.

    Returns:
        :class:`ImportanceResult`: ``accuracy_drop`` ``(d,)``, ``loss_rise`` ``(d,)``,
        ``accuracy`` / ``loss`` ``(d,)`` with each unit ablated, ``base_accuracy`` /
        ``base_loss`` (0-d), all float64; ``d`` the layer's units (channels of a conv output).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> r = unit_importance(net, "1", (x, y))
        >>> r.accuracy_drop.shape, r.loss_rise.dtype
        (torch.Size([16]), torch.float64)
        >>> float(r.base_accuracy) == float((net(x).argmax(1) == y).double().mean())
        True
    """
    name, module = resolve_layer(model, layer)
    check_choice(mode, "mode", ("zero", "mean"))
    _check_budget(max_batch, max_elements)
    check_choice(expand, "expand", ("auto", "layer", "input"))
    base = _check_unablated(unablated)
    _check_reiterable(data)
    layout = check_layout(layout) if layout is not None else None
    device = _model_device(model)
    with evaluating(model, restore_rng=True):
        st = _layer_pass(model, module, data, device, keep_rows=False, first_only=mode != "mean", name=name, layout=layout,
                         select=select, observe=observe)
        if distributed:
            _reduce_stats(st)
        d, ud = st.d, int(st.ud or 0)
        masks = ~torch.eye(d, dtype=torch.bool)  # row u ablates unit u alone
        if base is None:
            masks = torch.cat([torch.ones(1, d, dtype=torch.bool), masks])  # row 0: the model itself
        mean = (st.s1 / st.cnt) if mode == "mean" else None
        how = _PassOptions(device, loss_fn, max_batch, vectorize, expand, _max_elements(max_elements, device))
        correct, loss_sum, n = _run(model, module, data, _mask_perturb(masks, mean, ud, d), masks.shape[0], stats=st, how=how,
                                    select=select, name=name)
    if base is None:
        base_c, base_l, correct, loss_sum = correct[0], loss_sum[0], correct[1:], loss_sum[1:]
    else:
        base_c, base_l = torch.tensor(base[0], dtype=_F64), torch.tensor(base[1], dtype=_F64)
    res = ImportanceResult(correct, loss_sum, base_c, base_l, n, name, mode)
    return _checked(res.all_reduce() if distributed else res)


# ----------------------------------------------------------------------------- rank correlation
def _as_vector(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x, dtype=_F64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"Expected `{name}` to be a 1-D tensor of numbers, but got {type(x).__name__}.") from None
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"Expected `{name}` to be a real tensor, but got dtype {x.dtype}.")
    if x.ndim != 1:
        raise ValueError(f"Expected `{name}` to be 1-D (one value per unit), but got shape {tuple(x.shape)}.")
    return x.detach().to(_F64)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D float64 tensor; tied values share the mean of their ranks."""
    n = x.numel()
    srt, idx = torch.sort(x, stable=True)
    new = torch.ones(n, dtype=torch.bool, device=x.device)
    new[1:] = srt[1:] != srt[:-1]
    group = torch.cumsum(new.long(), 0) - 1
    pos = torch.arange(1, n + 1, dtype=_F64, device=x.device)
    size = int(group[-1]) + 1 if n else 0
    sums = torch.zeros(size, dtype=_F64, device=x.device).index_add_(0, group, pos)
    counts = torch.zeros(size, dtype=_F64, device=x.device).index_add_(0, group, torch.ones_like(pos))
    ranks = torch.empty(n, dtype=_F64, device=x.device)
    ranks[idx] = (sums / counts)[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor, *, nan_policy: str = "raise") -> torch.Tensor:
    """Spearman's rank correlation of two 1-D tensors: the Pearson correlation of their ranks, tied
    values taking the average of their ranks (as ``scipy.stats.spearmanr``), in float64.

    Args:
        a: ``(n,)`` values, e.g. ``unit_importance(...).accuracy_drop``.
        b: ``(n,)`` values, e.g. ``class_selectivity(...).values`` (NaN for dead units).
        nan_policy: ``"raise"`` (default): NaN in either input is an error; ``"omit"``: pairs
            with a NaN on either side are left out (dead units' selectivity).

    Returns:
        0-d float64 tensor in ``[-1, 1]``. NaN, with a ``RuntimeWarning``, when it is undefined:
        fewer than 2 pairs left, or one side constant (every unit tied, e.g. no single unit
        changes the accuracy on a small probe set).

    Example:
        >>> round(float(spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 20.0, 40.0]))), 4)
        0.9487
    """
    check_choice(nan_policy, "nan_policy", ("raise", "omit"))
    x, y = _as_vector(a, "a"), _as_vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"Expected `a` and `b` of the same length, but got {x.shape[0]} and {y.shape[0]}.")
    y = y.to(x.device)
    bad = torch.isnan(x) | torch.isnan(y)
    if bool(bad.any()):
        if nan_policy == "raise":
            raise ValueError(
                f"Expected `a` and `b` without NaN, but got {int(torch.isnan(x).sum())} and {int(torch.isnan(y).sum())} NaN "
                "value(s) (dead units have NaN selectivity); pass `nan_policy='omit'` to leave those pairs out."
            )
        x, y = x[~bad], y[~bad]
    nan = torch.tensor(float("nan"), dtype=_F64, device=x.device)
    if x.numel() < 2:
        warnings.warn(f"Spearman's rho of {x.numel()} pair(s) is undefined; returning NaN.", RuntimeWarning, stacklevel=2)
        return nan
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    if not bool(den > 0):
        warnings.warn(
            "Spearman's rho is undefined when one side is constant (all values tied); returning NaN.", RuntimeWarning, stacklevel=2
        )
        return nan
    return ((rx * ry).sum() / den).clamp(-1.0, 1.0)
