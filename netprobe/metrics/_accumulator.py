"""The contract every streaming accumulator of :mod:`netprobe.metrics` keeps.

An accumulator holds the sufficient statistics of a metric (sums, counts, co-moments) and not
the data, so a metric over many batches, processes or epochs costs memory that does not grow with
the number of samples. Its methods use torchmetrics' vocabulary: :meth:`~Accumulator.update`,
:meth:`~Accumulator.compute`, :meth:`~Accumulator.reset`, and Lightning's for checkpoints:
:meth:`~Accumulator.state_dict`, :meth:`~Accumulator.load_state_dict`.
"""

from __future__ import annotations

import abc
from typing import Any, Dict, TypeVar

__all__ = ["Accumulator"]

_A = TypeVar("_A", bound="Accumulator")


class Accumulator(abc.ABC):
    """A streaming metric: statistics updated batch by batch, merged across batches and ranks.

    The contract, kept by :class:`~netprobe.metrics.SimilarityAccumulator`,
    :class:`~netprobe.metrics.MinibatchCKA`, :class:`~netprobe.metrics.SelectivityAccumulator` and
    :class:`~netprobe.metrics.MutualInfoAccumulator`:

    - **Exact streaming.** :meth:`compute` after updates with batches ``b_1 .. b_k`` equals the
      metric of their concatenated rows (the accumulator's own functional form, e.g.
      :func:`~netprobe.metrics.class_selectivity`), up to floating-point rounding. (Where the metric
      itself depends on the batch partition, as :class:`~netprobe.metrics.MinibatchCKA` does, it
      equals one accumulator given the same batches.)
    - **Merging.** ``a.merge(b)`` with ``a`` and ``b`` updated over disjoint data equals one
      accumulator updated over both; the order of merges changes only rounding. An empty
      accumulator is the identity of :meth:`merge`. Accumulators of another kind, or built with
      other options (number of classes, bins, widths, bin edges), are refused.
    - **Reset.** :meth:`reset` returns the accumulator to its just-constructed state: empty, with
      the options its constructor was given (and only those: what the first batch fixed, such as
      widths or bin edges taken from its data, is forgotten).
    - **Checkpoints.** :meth:`state_dict` is a snapshot that later updates do not change, made of
      tensors and plain Python values (``torch.save`` stores it); :meth:`load_state_dict` on an
      accumulator built with the same options replaces its state with the snapshot, after which
      :meth:`compute` gives the saved accumulator's value and :meth:`update` continues as the saved
      one would have.
    - **Ranks.** :meth:`all_reduce` merges the statistics of every process under
      ``torch.distributed`` (a collective: every rank calls it) and is a no-op otherwise.

    ``update``, ``merge``, ``reset``, ``load_state_dict`` and ``all_reduce`` change the accumulator
    in place and return it, so calls chain.

    Example:
        >>> import torch
        >>> from netprobe.metrics import SelectivityAccumulator, class_selectivity
        >>> acts, labels = torch.tensor([[1.0, 2.0], [0.0, 2.0], [0.0, 1.0]]), torch.tensor([0, 1, 2])
        >>> left = SelectivityAccumulator(num_classes=3).update(acts[:2], labels[:2])
        >>> right = SelectivityAccumulator(num_classes=3).update(acts[2:], labels[2:])
        >>> merged = left.merge(right).compute().values
        >>> torch.equal(merged, class_selectivity(acts, labels, num_classes=3).values)
        True
        >>> restored = SelectivityAccumulator(num_classes=3).load_state_dict(left.state_dict())
        >>> torch.equal(restored.compute().values, merged), left.reset().n
        (True, 0)
    """

    @abc.abstractmethod
    def update(self: _A, *args: Any, **kwargs: Any) -> _A:
        """Add one batch of data to the statistics.

        Returns:
            ``self``.

        Raises:
            ValueError: data of the wrong shape, dtype or range, or unlike the earlier batches
                (e.g. another number of units).
        """

    @abc.abstractmethod
    def merge(self: _A, other: _A) -> _A:
        """Add another accumulator's statistics to this one's, in place; ``other`` is unchanged.

        Merging two accumulators updated over disjoint data gives the statistics of one accumulator
        updated over both.

        Args:
            other: an accumulator of the same class, built with the same options.

        Returns:
            ``self``.

        Raises:
            TypeError: ``other`` of another class (some accumulators raise ``ValueError`` here).
            ValueError: ``other`` built with other options, or with statistics of other widths.
        """

    @abc.abstractmethod
    def compute(self, *args: Any, **kwargs: Any) -> Any:
        """The metric of every row seen (after :meth:`all_reduce`, on every rank).

        Does not change the statistics: updating after ``compute`` continues the stream.

        Raises:
            ValueError: the accumulator is empty, or the data seen cannot define the metric.
        """

    @abc.abstractmethod
    def reset(self: _A) -> _A:
        """Forget every batch: back to the just-constructed state, keeping the constructor's options.

        Returns:
            ``self``.
        """

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """A snapshot of the statistics, for checkpoints; later updates do not change it.

        Returns:
            A dict of tensors and plain Python values, which :meth:`load_state_dict` accepts.
        """

    @abc.abstractmethod
    def load_state_dict(self: _A, state: Dict[str, Any]) -> _A:
        """Replace the statistics with those of a :meth:`state_dict` snapshot.

        Args:
            state: what :meth:`state_dict` returned, on an accumulator built with the same options.

        Returns:
            ``self``, whose :meth:`compute` equals the saved accumulator's.

        Raises:
            ValueError: a snapshot of an accumulator built with other options.
        """

    @abc.abstractmethod
    def all_reduce(self: _A) -> _A:
        """Merge the statistics of every rank (a collective under ``torch.distributed``; a no-op otherwise).

        Returns:
            ``self``, holding the statistics of every rank's data.
        """
