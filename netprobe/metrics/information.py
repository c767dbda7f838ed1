"""Per-unit mutual information with the class label, by equal-frequency binning.

Estimator: each unit's activations are discretized into ``bins`` equal-frequency (quantile) bins,
and the plug-in estimate

    I(A; Y) = sum_{b, c} p(b, c) log2( p(b, c) / (p(b) p(c)) )      [bits]

is computed from the joint counts. Bin edges are the unit's empirical quantiles at ``k / bins``
(``k = 1 .. bins-1``, the sorted column's element at index ``floor(k n / bins)``); a value ``v`` falls in bin ``#{edges <= v}``. Tied values (e.g. the many
exact zeros of a ReLU) cannot be split, so repeated edges merge bins: a constant unit ends in a
single bin and has MI exactly 0. The plug-in estimate is biased upwards by about
``(B - 1)(C - 1) / (2 n ln 2)`` bits for ``B`` occupied bins, ``C`` classes and ``n`` samples
(Miller-Madow), so compare values computed with the same ``bins`` and ``n``. MI lies in
``[0, min(log2 B, H(Y))]``; for balanced classes ``H(Y) = log2 C``.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch

from netprobe import distributed as _dist
from netprobe._validation import check_2d, check_finite, check_int, check_labels, clone_or_none

from ._accumulator import Accumulator

__all__ = ["mutual_information", "MutualInfoAccumulator", "quantile_edges"]

_F64 = torch.float64


def _check_bins(bins: int) -> int:
    check_int(bins, "bins", 2)
    return bins


def quantile_edges(acts: torch.Tensor, *, bins: int = 16) -> torch.Tensor:
    """Equal-frequency bin edges ``(d, bins - 1)`` of each column of ``acts`` ``(n, d)``.

    Edge ``k`` is the sorted column's element at index ``floor(k n / bins)``, so that with distinct
    values bin ``i`` holds the sorted elements ``[i n / bins, (i + 1) n / bins)``.
    """
    acts = check_2d(acts, "acts")
    check_finite(acts, "acts")
    bins = _check_bins(bins)
    n = acts.shape[0]
    if n < 1:
        raise ValueError("Expected at least one sample to place bin edges, but got n=0.")
    srt = acts.to(_F64).sort(dim=0).values
    idx = torch.tensor([min((k * n) // bins, n - 1) for k in range(1, bins)], device=srt.device)
    return srt[idx].T.contiguous()


class MutualInfoAccumulator(Accumulator):
    """Streaming joint (bin, class) counts per unit, with fixed bin edges.

    Bin edges must be fixed before counting: pass ``edges`` ``(d, bins - 1)`` (e.g. from
    :func:`quantile_edges` on a reference batch), or leave ``edges=None`` and the first batch given
    to :meth:`update` sets them (its quantiles). Counts merge by addition across batches and ranks,
    so the result equals :func:`mutual_information` on the concatenated data whenever the edges are
    the same (the functional form takes the edges from all of its data).

    Memory: ``8 * d * bins * num_classes`` bytes.
    """

    def __init__(self, num_classes: int, *, bins: int = 16, edges: Optional[torch.Tensor] = None) -> None:
        check_int(num_classes, "num_classes", 2)
        self.num_classes = num_classes
        self.bins = _check_bins(bins)
        if edges is not None:
            edges = check_2d(edges, "edges")
            if edges.shape[1] != bins - 1:
                raise ValueError(f"Expected `edges` of shape (d, {bins - 1}) for bins={bins}, but got {tuple(edges.shape)}.")
            edges = edges.to(_F64)
        self._given_edges = edges  # what `reset` returns to
        self.edges = edges
        self.counts: Optional[torch.Tensor] = None  # (d, bins, C)

    def update(self, acts: torch.Tensor, labels: torch.Tensor) -> "MutualInfoAccumulator":
        """Add a batch: ``acts`` ``(b, d)``, ``labels`` ``(b,)`` in ``[0, num_classes)``; returns ``self``.

        Without edges, the first non-empty batch sets them (its quantiles, with a ``RuntimeWarning``
        when it has fewer than ``10 * bins`` rows).
        """
        acts = check_2d(acts, "acts")
        check_finite(acts, "acts")
        labels = check_labels(labels, acts.shape[0], self.num_classes)
        if acts.shape[0] == 0 and self.edges is None:
            return self  # an empty first batch adds nothing (and has no data for the bin edges)
        if self.edges is None:
            if acts.shape[0] < 10 * self.bins:
                warnings.warn(
                    f"MutualInfoAccumulator: bin edges taken from a first batch of only {acts.shape[0]} rows for "
                    f"{self.bins} bins, so later batches are binned coarsely; pass `edges=quantile_edges(sample, "
                    f"bins={self.bins})` computed on more data (at least {10 * self.bins} rows).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.edges = quantile_edges(acts, bins=self.bins)
        d = self.edges.shape[0]
        if acts.shape[1] != d:
            raise ValueError(f"Expected {d} units (the edges' rows), but got {acts.shape[1]}.")
        a = acts.to(_F64).to(self.edges.device)
        b = torch.searchsorted(self.edges, a.T.contiguous(), right=True)  # (d, n) in [0, bins-1]
        c = labels.to(b.device)[None, :].expand_as(b)
        unit = torch.arange(d, device=b.device)[:, None].expand_as(b)
        flat = (unit * self.bins + b) * self.num_classes + c
        counts = torch.bincount(flat.flatten(), minlength=d * self.bins * self.num_classes)
        counts = counts.reshape(d, self.bins, self.num_classes).to(_F64)
        self.counts = counts if self.counts is None else self.counts + counts
        return self

    def merge(self, other: "MutualInfoAccumulator") -> "MutualInfoAccumulator":
        """Add another accumulator's counts (in place); returns ``self``. An accumulator without
        counts takes the other's edges (when it has none or the same).

        Raises:
            ValueError: ``other`` is not a MutualInfoAccumulator with the same ``num_classes`` and
                ``bins``, or uses other bin edges.
        """
        if not isinstance(other, MutualInfoAccumulator) or (other.num_classes, other.bins) != (self.num_classes, self.bins):
            raise ValueError("Can only merge a MutualInfoAccumulator with the same `num_classes` and `bins`.")
        if other.counts is not None:
            if self.counts is None and (self.edges is None or torch.equal(self.edges, other.edges)):
                # an empty accumulator takes the other's edges (as the other accumulators take its statistics)
                self.edges, self.counts = other.edges.clone(), other.counts.clone()  # type: ignore[union-attr]
                return self
            if self.edges is None or other.edges is None or not torch.equal(self.edges, other.edges):
                raise ValueError("Can only merge accumulators that use the same bin edges (pass `edges=` to both).")
            self.counts = other.counts.clone() if self.counts is None else self.counts + other.counts
        return self

    def all_reduce(self) -> "MutualInfoAccumulator":
        """Sum the counts over ranks (edges must be equal on every rank, e.g. broadcast or given)."""
        if _dist.is_distributed():
            _dist.require_all(self.counts is not None, "Every rank must `update` at least once before `all_reduce`.")
            self.counts = _dist.all_reduce_sum(self.counts)
        return self

    def reset(self) -> "MutualInfoAccumulator":
        """Forget every count, and the edges unless the constructor was given them; returns ``self``."""
        self.edges, self.counts = self._given_edges, None
        return self

    def state_dict(self) -> Dict[str, Any]:
        """A snapshot (copies: later updates do not change it)."""
        return {"num_classes": self.num_classes, "bins": self.bins, "edges": clone_or_none(self.edges), "counts": clone_or_none(self.counts)}

    def load_state_dict(self, state: Dict[str, Any]) -> "MutualInfoAccumulator":
        """Replace the edges and counts with a :meth:`state_dict` snapshot's; returns ``self``.

        Raises:
            ValueError: a snapshot of another ``num_classes`` or ``bins``.
        """
        if (state["num_classes"], state["bins"]) != (self.num_classes, self.bins):
            raise ValueError(
                f"State has num_classes={state['num_classes']}, bins={state['bins']}; this accumulator "
                f"num_classes={self.num_classes}, bins={self.bins}."
            )
        self.edges, self.counts = clone_or_none(state["edges"]), clone_or_none(state["counts"])
        return self

    def compute(self) -> torch.Tensor:
        """Per-unit mutual information with the label, ``(d,)`` float64, in bits."""
        if self.counts is None:
            raise ValueError("The accumulator is empty: call `update(acts, labels)` first.")
        joint = self.counts
        n = joint.sum((1, 2), keepdim=True)
        p = joint / n
        pb = p.sum(2, keepdim=True)
        pc = p.sum(1, keepdim=True)
        ratio = p / (pb * pc).where(p > 0, torch.ones_like(p))
        terms = torch.where(p > 0, p * torch.log2(ratio.where(p > 0, torch.ones_like(p))), torch.zeros_like(p))
        return terms.sum((1, 2)).clamp_min(0.0)


def mutual_information(acts: torch.Tensor, labels: torch.Tensor, *, num_classes: int, bins: int = 16) -> torch.Tensor:
    """Mutual information (bits) between each unit and the class label; see the module docstring.

    Args:
        acts: ``(n, d)`` activations (any sign).
        labels: ``(n,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes.
        bins: equal-frequency bins per unit (default 16).

    Returns:
        ``(d,)`` float64 tensor, >= 0.

    Example:
        >>> labels = torch.arange(4).repeat(50)
        >>> acts = torch.stack([labels.double(), torch.ones(200)], 1)   # a label code, a constant
        >>> mutual_information(acts, labels, num_classes=4, bins=8).tolist()
        [2.0, 0.0]
    """
    acts = check_2d(acts, "acts")
    return MutualInfoAccumulator(num_classes, bins=bins, edges=quantile_edges(acts, bins=bins)).update(acts, labels).compute()
