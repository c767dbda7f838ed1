"""Observing which axis of a layer's output holds the batch.

The model is run (by :class:`netprobe.layers.Layouts`, under ``no_grad``, in eval mode, RNG
restored) on the same inputs resized to two batch sizes that equal no other axis length of the
inputs; the batch axis of an output is the one axis whose length is the batch size in both runs.
This module holds the pure parts of that: resizing inputs, choosing the sizes, and reading the
two shapes. Knows nothing of Lightning.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch

__all__ = ["Site", "LayoutDecisions", "observation_sizes", "resize_batch", "read_site", "input_batch_lengths", "input_signature"]

# Batch sizes tried, in order; the first two that equal no non-batch axis length of the inputs are used.
_CANDIDATES = (5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97)


@dataclasses.dataclass(frozen=True)
class Site:
    """What observation established for one call site of a layer (its ``call``-th call in a forward).

    Attributes:
        batch: the axis whose length followed the batch size, or ``None`` when no single axis did.
        ndim: the output's rank.
        shapes: the output's shape at the two observed batch sizes.
        sizes: the two batch sizes.
        unit: the units axis followed through the forward pass (module types and operations), or
            ``None`` when it could not be followed.
        problem: why there is no batch axis (``None`` when ``batch`` is set).
        primary: the tensor read is the first of the module's output (the one ``batch_first``
            describes).
    """

    batch: Optional[int]
    ndim: int
    shapes: Tuple[Tuple[int, ...], Tuple[int, ...]]
    sizes: Tuple[int, int]
    unit: Optional[int]
    problem: Optional[str]
    primary: bool = True


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from _tensors(o)


def _batch_dim(t: torch.Tensor, seq_first: bool) -> int:
    """The batch axis of an input tensor: the first, or the second of a 3-D input to a module
    whose own ``batch_first`` is ``False``."""
    return 1 if (seq_first and t.ndim == 3) else 0


def input_batch_lengths(args: Any, kwargs: Any, *, seq_first: bool = False) -> Set[int]:
    """The batch-axis lengths of the tensors among ``args`` and ``kwargs`` (nested in lists,
    tuples and dicts), each read on :func:`_batch_dim`."""
    out: Set[int] = set()
    for t in list(_tensors(args)) + list(_tensors(kwargs)):
        if t.ndim >= 1 and not t.is_nested:
            out.add(int(t.shape[_batch_dim(t, seq_first)]))
    return out


def observation_sizes(args: Any, kwargs: Any, *, seq_first: bool = False) -> Tuple[int, int]:
    """Two batch sizes that equal no length of a non-batch axis of any input tensor."""
    taken: Set[int] = set()
    for t in list(_tensors(args)) + list(_tensors(kwargs)):
        if t.is_nested:
            continue
        bd = _batch_dim(t, seq_first) if t.ndim else -1
        taken.update(int(s) for i, s in enumerate(t.shape) if i != bd)
    free = [c for c in _CANDIDATES if c not in taken]
    return free[0], free[1]


def resize_batch(obj: Any, n: int, *, seq_first: bool = False) -> Any:
    """``obj`` (a tensor, or lists, tuples and dicts of them) with every tensor's batch axis resized
    to ``n`` by repeating its rows in order (row ``i`` is input row ``i mod N``). A tensor with no
    rows, or of rank 0, is kept; so are plain values, types and callables. Any other object (a
    key/value cache, a config) is deep-copied, so the observed passes cannot change the one the
    user's call receives; :class:`UncopiableInput` when it cannot be copied."""
    if isinstance(obj, torch.Tensor):
        if obj.ndim == 0 or obj.is_nested:
            return obj
        bd = _batch_dim(obj, seq_first)
        rows = obj.shape[bd]
        if rows == 0:
            return obj
        idx = torch.arange(n, device=obj.device) % rows
        return obj.index_select(bd, idx)
    if isinstance(obj, tuple):
        items = [resize_batch(o, n, seq_first=seq_first) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [resize_batch(o, n, seq_first=seq_first) for o in obj]
    if isinstance(obj, dict):
        resized = {k: resize_batch(v, n, seq_first=seq_first) for k, v in obj.items()}
        if type(obj) is dict:
            return resized
        try:
            return type(obj)(resized)
        except Exception:
            return resized
    if isinstance(obj, _PLAIN) or isinstance(obj, (enum.Enum, type)) or callable(obj):
        return obj
    try:  # an object the forward may change (a key/value cache): the observed passes get a copy
        return copy.deepcopy(obj)
    except Exception as e:  # noqa: BLE001 - reported at the layer, with the way out
        raise UncopiableInput(
            f"an argument of type {type(obj).__name__} cannot be copied ({type(e).__name__}: {e}), and running the "
            "model again on the argument itself could change it") from e


class UncopiableInput(Exception):
    """A forward argument that the observed passes would have to share with the user's call."""


def read_site(shapes: Sequence[Tuple[int, ...]], sizes: Tuple[int, int], unit: Optional[int], primary: bool = True) -> Site:
    """The :class:`Site` of one call site from its output shapes at the two batch sizes."""
    (a, b), (na, nb) = shapes, sizes
    if len(a) != len(b):
        return Site(None, len(b), (a, b), sizes, unit,
                    f"its output has {len(a)} axes at batch size {na} and {len(b)} at {nb}", primary)
    follows: List[int] = [i for i in range(len(a)) if a[i] == na and b[i] == nb]
    grows = [i for i in range(len(a)) if a[i] != b[i] and i not in follows]
    if len(follows) == 1 and not grows:
        return Site(follows[0], len(a), (a, b), sizes, unit, None, primary)
    if not follows:
        why = "no axis of its output has the batch size" + (
            f" (axis {grows[0]} grows with it but is not one row per input: windows or positions folded into it)"
            if grows else "")
    elif len(follows) > 1:
        why = f"axes {follows} all follow the batch size (an input-by-input output)"
    else:
        why = f"besides axis {follows[0]}, axis {grows[0]} also changes with the batch size"
    return Site(None, len(a), (a, b), sizes, unit, why, primary)


_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _arg_signature(obj: Any, seq_first: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.is_nested or obj.ndim == 0:
            return (obj.ndim, str(obj.dtype))
        bd = _batch_dim(obj, seq_first)
        return tuple(-1 if i == bd else int(s) for i, s in enumerate(obj.shape)) + (str(obj.dtype),)
    if isinstance(obj, _PLAIN) or isinstance(obj, enum.Enum):
        return ("value", type(obj).__name__, obj)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__,) + tuple(_arg_signature(o, seq_first) for o in obj)
    if isinstance(obj, Mapping):
        return ("mapping",) + tuple((repr(k), _arg_signature(v, seq_first)) for k, v in obj.items())
    return ("object", type(obj).__module__, type(obj).__qualname__)


def input_signature(args: Any, kwargs: Any, *, seq_first: bool = False) -> Tuple[Any, ...]:
    """What of a forward call's inputs a layout decision may depend on: the structure of the
    arguments (keyword names included), each tensor's rank, non-batch axis lengths and dtype, the
    value of every plain argument (numbers, strings, flags, ``None``) and the type of every other
    object; batch sizes left out. Inputs that differ here are observed afresh."""
    return (_arg_signature(tuple(args), seq_first), _arg_signature(dict(kwargs or {}), seq_first))


class LayoutDecisions:
    """What observation established, to be carried to later forward passes: a monitor keeps one
    per fit, so each layer is observed once, at its first measurement, and every later measurement
    reuses the decision (and checks it). Keyed by the module entered (its qualified name), the
    inputs' :func:`input_signature` and the layer, so inputs of another shape (another sequence
    length) are observed afresh.

    Pass it as ``observe=`` to :func:`netprobe.probe`, :func:`~netprobe.metrics.ablation_curve`,
    :func:`~netprobe.metrics.noise_curve` or :func:`~netprobe.metrics.unit_importance`.

    Example:
        >>> import netprobe
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        >>> seen = netprobe.LayoutDecisions()
        >>> for _ in range(3):
        ...     with netprobe.probe(m, ["1"], observe=seen) as p:
        ...         _ = m(torch.randn(6, 4))
        >>> len(seen.layers)  # observed once: one entry module, one input signature
        1
    """

    def __init__(self) -> None:
        # (entry name, signature) -> None when observed, else why the model could not be run again
        self.failed: dict = {}
        self.seq_first: dict = {}  # (entry name, signature) -> the 3-D inputs are (T, N, ...)
        self.sites: dict = {}  # (entry name, signature, layer, selector key, call index) -> Site
        self.layers: dict = {}  # (entry name, signature) -> {(layer, selector key)} observed

    def covers(self, key: Tuple[Any, Any], layers: Iterable[Tuple[str, Any]]) -> bool:
        """Whether every ``(layer, selector key)`` was observed for ``key`` (or observation failed there)."""
        if key in self.failed and self.failed[key] is not None:
            return True
        seen = self.layers.get(key, set())
        return all(lk in seen for lk in layers)
