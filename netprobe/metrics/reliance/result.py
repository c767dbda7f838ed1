"""The result of a reliance curve (:class:`CurveResult`: the curve, its area and normalized area)
and how a model's outputs are scored (accuracy and mean loss)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe.metrics.reliance._inputs import _F64, LossFn, _check_scores, _check_targets

__all__ = ["CurveResult", "score"]


@dataclass(frozen=True)
class CurveResult:
    """An ablation or noise curve with its sufficient statistics.

    Attributes:
        x: ``(k,)`` the ablated fractions (ablation) or noise scales (noise), ascending, ``x[0] == 0``.
        correct: ``(repeats, k)`` float64 number of correct predictions per repeat and point.
        loss_sum: ``(repeats, k)`` float64 summed per-sample loss.
        count: number of samples evaluated (per point).
        kind: ``"ablation"`` or ``"noise"``.
        layer: the qualified name of the layer.
        order: ``(repeats, d)`` the unit orders used (ablation), else ``None``.
    """

    x: torch.Tensor
    correct: torch.Tensor
    loss_sum: torch.Tensor
    count: int
    kind: str
    layer: str
    order: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def fractions(self) -> torch.Tensor:
        """The curve's points, ``(k,)``: the ablated fractions of an ablation curve (the same tensor as :attr:`scales`)."""
        return self.x

    @property
    def scales(self) -> torch.Tensor:
        """The curve's points, ``(k,)``: the noise scales of a noise curve (the same tensor as :attr:`fractions`)."""
        return self.x

    @property
    def accuracy_per_repeat(self) -> torch.Tensor:
        """Accuracy at each point for each order or noise draw, ``(repeats, k)``."""
        return self.correct / self.count

    @property
    def loss_per_repeat(self) -> torch.Tensor:
        """Mean loss at each point for each order or noise draw, ``(repeats, k)``."""
        return self.loss_sum / self.count

    @property
    def accuracy(self) -> torch.Tensor:
        """``(k,)`` accuracy at each point, averaged over repeats."""
        return self.accuracy_per_repeat.mean(0)

    @property
    def loss(self) -> torch.Tensor:
        """``(k,)`` mean per-sample loss at each point, averaged over repeats."""
        return self.loss_per_repeat.mean(0)

    @property
    def auc(self) -> torch.Tensor:
        """Trapezoidal area under the accuracy curve over ``x``, divided by the unablated accuracy
        and by the span of ``x``: 1.0 means no degradation, lower means more reliance.

        When the unablated accuracy is 0 there is nothing to degrade: the AUC is defined as 0.0
        (and a warning says so).
        """
        acc = self.accuracy
        base = acc[0]
        span = self.x[-1] - self.x[0]
        if not bool(base > 0):
            warnings.warn(
                f"Unablated accuracy on layer {self.layer!r} is 0; the normalized AUC is set to 0.0.",
                RuntimeWarning,
                stacklevel=2,
            )
            return torch.zeros((), dtype=_F64, device=acc.device)
        if not bool(span > 0):
            return torch.ones((), dtype=_F64, device=acc.device)
        return torch.trapezoid(acc, self.x) / (base * span)

    def all_reduce(self) -> "CurveResult":
        """Sum the statistics over ranks (each rank evaluated its shard of the data, with the same
        generator seed so the unit orders agree). A collective under torch.distributed; returns
        ``self`` otherwise."""
        if not _dist.is_distributed():
            return self
        flat = torch.cat([self.correct.flatten(), self.loss_sum.flatten(),
                          torch.tensor([float(self.count)], dtype=_F64, device=self.correct.device)])
        flat = _dist.all_reduce_sum(flat)
        r, k = self.correct.shape
        return replace(self, correct=flat[: r * k].reshape(r, k), loss_sum=flat[r * k : 2 * r * k].reshape(r, k),
                       count=int(flat[-1]))


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy. For few classes on CPU, log-sum-exp written out is several times
    faster than torch's kernel (which vectorizes poorly over a short class dimension); same values
    to rounding. Otherwise (and for targets such as ignore_index=-100) torch's own."""
    if out.device.type == "cpu" and out.shape[1] <= 32 and out.is_floating_point() and y.numel() and bool(y.min() >= 0):
        top = out.amax(1, keepdim=True)
        return (out - top).exp().sum(1).log() + top.squeeze(1) - out.gather(1, y.long()[:, None]).squeeze(1)
    return nn.functional.cross_entropy(out, y, reduction="none")


def score(outputs: torch.Tensor, targets: torch.Tensor, *, loss_fn: Optional[LossFn] = None) -> Tuple[float, float]:
    """``(correct, loss_sum)``: the number of correct argmax predictions and the summed per-sample
    loss (``loss_fn``, default cross-entropy) of class scores ``outputs`` ``(batch, num_classes)``
    for class-index ``targets`` ``(batch,)``, in float64: the statistics of one curve point, as
    :func:`ablation_curve` computes them (e.g. for its ``unablated`` argument).

    Example:
        >>> score(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))[0]
        1.0
    """
    _check_targets(outputs, targets)
    _check_scores(outputs, targets)
    outputs = outputs.detach()  # (outputs of a training step: no graph, no warning from float())
    hit = (outputs.argmax(1) == targets).to(_F64).sum()
    return float(hit), float(_per_sample_loss(loss_fn, outputs, targets).to(_F64).sum())


def _per_sample_loss(loss_fn: Optional[LossFn], out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if loss_fn is None:
        return _cross_entropy(out, y)
    loss = loss_fn(out, y)
    if not isinstance(loss, torch.Tensor) or loss.shape != (out.shape[0],):
        raise ValueError(
            "Expected `loss_fn(outputs, targets)` to return per-sample losses of shape "
            f"({out.shape[0]},) (e.g. reduction='none'), but got "
            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}."
        )
    return loss
