"""What the reliance metrics accept and check: the data (a ``(x, y)`` pair or a re-iterable of
batches), targets, class scores, ablated fractions and noise scales, the stacked-pass budget, and
the results' finiteness (:class:`NonFiniteError`)."""

from __future__ import annotations

import collections.abc
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from netprobe._validation import check_int
from netprobe.layers import (
    LayoutDecisions,
    split_batch,
)

if TYPE_CHECKING:  # pragma: no cover
    from netprobe.metrics.reliance.result import CurveResult

__all__ = ["DEFAULT_MAX_ELEMENTS", "NonFiniteError", "Data", "LossFn", "MaxElements", "Observe"]


#: ``observe=``: True (observe each call site's batch axis), False (trust ``layout=``), or the
#: decisions to carry from an earlier call (see :class:`netprobe.layers.Layouts`)
Observe = Union[bool, LayoutDecisions]

_F64 = torch.float64

MaxElements = Union[int, str, None]

Data = Union[Tuple[torch.Tensor, torch.Tensor], Iterable[Any]]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- helpers
def _check_reiterable(data: Data) -> None:
    """The curves pass over ``data`` more than once: a one-shot iterator would be empty the second time."""
    if isinstance(data, collections.abc.Iterator):  # (no iter() here: it would start DataLoader workers)
        raise TypeError(
            f"Expected `data` that can be iterated several times (a list of batches, a DataLoader, or an "
            f"(inputs, targets) pair), but got a one-shot iterator ({type(data).__name__}); the curve passes "
            "over the data more than once. Wrap it: `list(...)`."
        )


def _check_targets(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"Expected inputs and targets with the same first dimension, but got {x.shape[0]} and {y.shape[0]}.")
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"Expected class-index targets: a 1-D integer tensor (batch,), but got dtype {y.dtype} and shape "
            f"{tuple(y.shape)}. For one-hot or soft targets pass `targets.argmax(1)`."
        )


def _batches(data: Data) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        _check_targets(data[0], data[1])
        yield data[0], data[1]
        return
    try:
        it = iter(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            "Expected `data` to be an (inputs, targets) pair of tensors or an iterable of such batches "
            f"(e.g. a DataLoader), but got {type(data).__name__}."
        ) from None
    for batch in it:
        pair = split_batch(batch, "Pass (inputs, targets) batches instead.")
        if pair is None or not all(isinstance(t, torch.Tensor) for t in pair):
            raise TypeError(
                "Expected each batch of `data` to be an (inputs, targets) pair of tensors, but got "
                f"{type(batch).__name__}."
            )
        _check_targets(pair[0], pair[1])
        yield pair[0], pair[1]


def _check_scores(out: Any, y: torch.Tensor) -> None:
    """The model's output must be class scores that the targets index."""
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError(
            "Expected the model to return class scores (batch, num_classes), but got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}. Pass a module whose forward "
            "returns the scores (wrap a model that returns a tuple or dict); with the Lightning monitors, override "
            "`forward(pl_module, x)`."
        )
    if out.shape[1] < 2:
        raise ValueError(
            f"Expected class scores for at least 2 classes, but the model returns {out.shape[1]} per input (a single "
            "binary logit?). Return two scores, e.g. `torch.cat([-z, z], 1)` for a logit `z`."
        )
    if y.numel() and int(y.max()) >= out.shape[1]:
        raise ValueError(f"Targets reach class {int(y.max())}, but the model returns scores for {out.shape[1]} classes.")


class NonFiniteError(ValueError):
    """The network's outputs (hence its loss) are not finite: a diverged network has no reliance."""


def _check_finite_loss(res: "CurveResult") -> "CurveResult":
    """A network whose own (unablated) outputs are NaN has no accuracy to lose: refuse it rather
    than return a curve whose normalized area (flat at the share of one class) reads as perfect
    robustness. Non-finite losses elsewhere (ablated points of a model that divides by a norm, or
    ``-inf`` log-probabilities) leave the accuracy curve defined: a warning, not an error."""
    if bool(torch.isnan(res.loss_sum[..., 0]).any()):
        raise NonFiniteError(
            "The loss is NaN on `data` before any ablation: the network's outputs are not finite (diverged "
            "training?), so its reliance is undefined. Check the model, or pass a `loss_fn` that is finite here."
        )
    if not bool(torch.isfinite(res.loss_sum).all()):
        warnings.warn(
            f"The loss is not finite at some points of the {res.kind} curve (e.g. a normalization that divides by "
            "the ablated units' norm, or -inf scores); the accuracy curve and its AUC are unaffected, the loss "
            "curve has NaN/inf there.",
            RuntimeWarning,
            stacklevel=3,
        )
    return res


def _check_count(res: "CurveResult") -> "CurveResult":
    """A curve over no samples has no accuracy (0/0): refuse it rather than report an area of 0."""
    if res.count == 0:
        raise ValueError(
            f"`data` holds no samples (its batches are empty), so the {res.kind} curve of layer {res.layer!r} is "
            "undefined. Pass data with at least one sample."
        )
    return res


def _model_device(model: nn.Module) -> Optional[torch.device]:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def _check_points(x: Sequence[float], name: str, lo: float, hi: Optional[float]) -> torch.Tensor:
    try:
        t = torch.as_tensor(list(x), dtype=_F64)
    except (TypeError, ValueError):
        raise TypeError(f"Expected `{name}` to be a sequence of numbers, but got {x!r}.") from None
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"Expected at least 2 `{name}`, but got {t.tolist()}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"Expected finite `{name}`, but got {t.tolist()} (NaN or inf has no place on the curve's axis).")
    if float(t[0]) != 0.0:
        raise ValueError(f"Expected `{name}` to start at 0 (the unablated reference), but got {t.tolist()}.")
    if bool((t[1:] <= t[:-1]).any()) or float(t.min()) < lo or (hi is not None and float(t.max()) > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"Expected strictly increasing `{name}` in {rng}, but got {t.tolist()}.")
    return t


def _check_budget(max_batch: int, max_elements: MaxElements) -> None:
    check_int(max_batch, "max_batch", 1)
    if max_elements is not None and max_elements != "auto" and (
        not isinstance(max_elements, int) or isinstance(max_elements, bool) or max_elements < 1
    ):
        raise ValueError(f"Expected `max_elements` to be a positive int, 'auto' or None, but got {max_elements!r}.")


#: Default bound on the elements of any module output in a stacked pass (``max_elements="auto"``):
#: 2^18 (1 MiB of float32) when the model is on the CPU, 2^21 (8 MiB) on an accelerator
#: (the measurements behind them: docs/reliance.md, "Stacked passes").
DEFAULT_MAX_ELEMENTS = {"cpu": 2**18, "other": 2**21}


def _max_elements(max_elements: MaxElements, device: Optional[torch.device]) -> Optional[int]:
    if max_elements != "auto":
        return max_elements  # type: ignore[return-value]
    return DEFAULT_MAX_ELEMENTS["cpu" if device is None or device.type == "cpu" else "other"]
