"""Class selectivity per unit (Morcos et al. 2018), functional and streaming.

For a unit with class-conditional mean activations ``mu_c``, with ``mu_max`` the largest and
``mu_rest`` the mean of the others,

    selectivity = (mu_max - mu_rest) / (mu_max + mu_rest)

0 when the unit responds equally to every class, 1 when it responds to one class only. It is
defined for non-negative activations (probe after the ReLU). A unit that is zero on every sample
(dead) has no selectivity: it is reported as NaN and counted, never averaged in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch

from netprobe import distributed as _dist
from netprobe._validation import check_2d, check_finite, check_int, check_labels, clone_or_none

from ._accumulator import Accumulator

__all__ = ["class_selectivity", "SelectivityResult", "SelectivityAccumulator"]

_F64 = torch.float64


@dataclass(frozen=True)
class SelectivityResult:
    """Per-unit class selectivity.

    Attributes:
        values: ``(d,)`` float64 selectivity in ``[0, 1]``; NaN for dead units.
        dead: ``(d,)`` bool, units that were zero on every sample.
        num_dead: number of dead units.
        mean: 0-d float64, mean selectivity over live units (NaN only when every unit is dead).
        class_means: ``(num_classes, d)`` float64 class-conditional means (NaN rows for classes
            absent from the data, which take no part in the index).
        present: ``(num_classes,)`` bool, classes seen at least once.
    """

    values: torch.Tensor
    dead: torch.Tensor
    num_dead: int
    mean: torch.Tensor
    class_means: torch.Tensor
    present: torch.Tensor

    @property
    def num_units(self) -> int:
        """The number of units measured."""
        return int(self.values.shape[0])


def _check_nonnegative(acts: torch.Tensor) -> None:
    if acts.numel() and bool((acts < 0).any()):
        n_neg = int((acts < 0).sum())
        raise ValueError(
            f"Expected non-negative activations for class selectivity, but got {n_neg} negative value(s) "
            f"(min {float(acts.min()):.4g}). The index is defined for post-ReLU outputs: probe the "
            "activation module (e.g. the nn.ReLU after the layer), not the linear/conv output."
        )


class SelectivityAccumulator(Accumulator):
    """Streaming per-class sums and counts (float64) from which selectivity is computed.

    Memory: ``8 * num_classes * (d + 1)`` bytes. Batches and ranks merge by addition, so the result
    equals :func:`class_selectivity` on the concatenated data.

    Example:
        >>> acc = SelectivityAccumulator(num_classes=3)
        >>> _ = acc.update(torch.tensor([[1.0, 2.0], [0.0, 2.0]]), torch.tensor([0, 1]))
        >>> _ = acc.update(torch.tensor([[0.0, 2.0]]), torch.tensor([2]))
        >>> acc.compute().values.tolist()
        [1.0, 0.0]
    """

    def __init__(self, num_classes: int) -> None:
        check_int(num_classes, "num_classes", 2)
        self.num_classes = num_classes
        self.sums: torch.Tensor | None = None  # (C, d)
        self.counts: torch.Tensor | None = None  # (C,)

    @property
    def n(self) -> int:
        """The number of samples seen."""
        return 0 if self.counts is None else int(self.counts.sum())

    def update(self, acts: torch.Tensor, labels: torch.Tensor) -> "SelectivityAccumulator":
        """Add a batch: ``acts`` ``(b, d)`` non-negative, ``labels`` ``(b,)`` in ``[0, num_classes)``."""
        acts = check_2d(acts, "acts")
        check_finite(acts, "acts")
        labels = check_labels(labels, acts.shape[0], self.num_classes)
        _check_nonnegative(acts)
        a = acts.to(_F64)
        labels = labels.to(a.device)
        if self.sums is None:
            self.sums = torch.zeros((self.num_classes, a.shape[1]), dtype=_F64, device=a.device)
            self.counts = torch.zeros((self.num_classes,), dtype=_F64, device=a.device)
        elif self.sums.shape[1] != a.shape[1]:
            raise ValueError(f"Expected batches with {self.sums.shape[1]} units like the first one, but got {a.shape[1]}.")
        self.sums.index_add_(0, labels, a)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=_F64))  # type: ignore[union-attr]
        return self

    def merge(self, other: "SelectivityAccumulator") -> "SelectivityAccumulator":
        """Add another accumulator's sums and counts (in place); returns ``self``.

        Raises:
            ValueError: ``other`` is not a SelectivityAccumulator with the same ``num_classes``, or
                counts another number of units.
        """
        if not isinstance(other, SelectivityAccumulator) or other.num_classes != self.num_classes:
            raise ValueError("Can only merge a SelectivityAccumulator with the same `num_classes`.")
        if other.sums is not None:
            if self.sums is None:
                self.sums, self.counts = other.sums.clone(), other.counts.clone()  # type: ignore[union-attr]
            else:
                if other.sums.shape != self.sums.shape:
                    raise ValueError(f"Cannot merge statistics of {other.sums.shape[1]} units into {self.sums.shape[1]} units.")
                self.sums += other.sums
                self.counts += other.counts  # type: ignore[operator]
        return self

    def all_reduce(self) -> "SelectivityAccumulator":
        """Sum the statistics over ranks (a collective under torch.distributed; no-op otherwise)."""
        if _dist.is_distributed():
            _dist.require_all(self.sums is not None, "Every rank must `update` at least once before `all_reduce`.")
            flat = _dist.all_reduce_sum(torch.cat([self.sums.flatten(), self.counts]))  # type: ignore[list-item]
            c, d = self.sums.shape
            self.sums, self.counts = flat[: c * d].reshape(c, d), flat[c * d :]
        return self

    def reset(self) -> "SelectivityAccumulator":
        """Forget every batch (and the number of units they fixed); returns ``self``, as if just constructed."""
        self.sums = self.counts = None
        return self

    def state_dict(self) -> Dict[str, Any]:
        """A snapshot (copies: later updates do not change it)."""
        return {"num_classes": self.num_classes, "sums": clone_or_none(self.sums), "counts": clone_or_none(self.counts)}

    def load_state_dict(self, state: Dict[str, Any]) -> "SelectivityAccumulator":
        """Replace the sums and counts with a :meth:`state_dict` snapshot's; returns ``self``.

        Raises:
            ValueError: a snapshot of another ``num_classes``.
        """
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"State has num_classes={state['num_classes']}, this accumulator {self.num_classes}.")
        self.sums, self.counts = clone_or_none(state["sums"]), clone_or_none(state["counts"])
        return self

    def compute(self) -> SelectivityResult:
        """The class selectivity of every row seen; see :func:`class_selectivity`."""
        if self.sums is None or self.counts is None:
            raise ValueError("The accumulator is empty: call `update(acts, labels)` first.")
        present = self.counts > 0
        n_present = int(present.sum())
        if n_present < 2:
            raise ValueError(
                f"Class selectivity needs samples of at least 2 classes, but only {n_present} class(es) "
                "occur in the data. Use a probe set that covers the classes."
            )
        means = self.sums / self.counts.clamp_min(1)[:, None]
        pm = means[present]  # (P, d)
        mu_max = pm.max(0).values
        mu_rest = (pm.sum(0) - mu_max) / (n_present - 1)
        den = mu_max + mu_rest
        dead = den <= 0  # non-negative: only when every class mean is 0
        values = torch.where(dead, torch.full_like(den, float("nan")), (mu_max - mu_rest) / den.where(~dead, torch.ones_like(den)))
        values = values.clamp(0.0, 1.0)  # rounding only; NaN passes through
        live = values[~dead]
        mean = live.mean() if live.numel() else torch.tensor(float("nan"), dtype=_F64, device=values.device)
        class_means = torch.where(present[:, None], means, torch.full_like(means, float("nan")))
        return SelectivityResult(values, dead, int(dead.sum()), mean, class_means, present)


def class_selectivity(acts: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> SelectivityResult:
    """Class selectivity index of every unit (Morcos et al. 2018).

    Args:
        acts: ``(n, d)`` non-negative activations (post-ReLU; for conv layers the per-channel
            spatial mean, the probe's default reduction).
        labels: ``(n,)`` integer class labels in ``[0, num_classes)``.
        num_classes: number of classes. Classes absent from ``labels`` take no part (at least 2
            must be present).

    Returns:
        :class:`SelectivityResult` with ``values`` ``(d,)`` (NaN for dead units), ``num_dead`` and
        ``mean`` over live units.

    Raises:
        ValueError: negative activations (with a hint to probe after the ReLU), NaN/Inf, labels
            out of range or of the wrong length, fewer than 2 classes present.

    Example:
        >>> acts = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
        >>> r = class_selectivity(acts, torch.tensor([0, 1, 2]), num_classes=3)
        >>> r.values.tolist()[:2], r.num_dead      # one-class unit: 1; constant unit: 0; dead: NaN
        ([1.0, 0.0], 1)
    """
    return SelectivityAccumulator(num_classes).update(acts, labels).compute()
