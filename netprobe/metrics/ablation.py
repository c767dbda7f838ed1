"""Single-direction reliance (Morcos et al. 2018): cumulative ablation and noise-robustness curves.

Measure reliance on the TRAINING data with the labels the network was trained on. On held-out
data a memorizing network is near chance before any ablation, so its normalized curve is flat and
the signal inverts (a network that memorized looks robust). The papers' finding is that networks
that generalize are *less* reliant on single directions: their training-set accuracy degrades
slowly as units are ablated, giving a larger area under the curve.

Both functions evaluate the model under ``torch.no_grad()`` in eval mode and leave it exactly as
they found it (every module's training flag, parameters, buffers, hooks, the global RNG).
Randomness (unit orders, noise) comes from the caller's ``torch.Generator`` only.

Vectorization: instead of one forward pass per ablation mask, a batch of ``b`` inputs is repeated
``m`` times and ``m`` different masks are applied at the layer in one forward pass (``m`` chosen so
that ``m * b <= max_batch`` and that no module output of the stacked pass holds more than
``max_elements`` elements, measured per input row on a few rows of the first batch). This assumes the model treats samples independently in eval mode,
which holds for standard layers (eval-mode BatchNorm and Dropout included), not for layers that mix
samples across the batch.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe._modules import (INPUT_KEYS, TARGET_KEYS, Layouts, observing, check_layout, evaluating, resolve_layer,
                               select_output)
from netprobe._observe import LayoutDecisions

#: ``observe=``: True (observe each call site's batch axis), False (trust ``layout=``), or the
#: decisions to carry from an earlier call (see :class:`netprobe._modules.Layouts`)
Observe = Union[bool, LayoutDecisions]

__all__ = ["ablation_curve", "noise_curve", "CurveResult", "score", "selectivity_order", "DEFAULT_FRACTIONS", "DEFAULT_SCALES",
           "DEFAULT_MAX_ELEMENTS"]

_F64 = torch.float64
DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))
DEFAULT_SCALES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
#: Default bound on the elements of any module output in a stacked pass (``max_elements="auto"``):
#: 2^18 (1 MiB of float32) when the model is on the CPU, where passes that stay in cache ran
#: fastest (the ConvNet task: 191 ms at 2^18, 222 ms at 2^19, 264 ms at 2^20, 203 ms at 2^17);
#: 2^21 (8 MiB) on an accelerator, where fewer, larger passes amortize kernel launches.
DEFAULT_MAX_ELEMENTS = {"cpu": 2**18, "other": 2**21}
MaxElements = Union[int, str, None]

Data = Union[Tuple[torch.Tensor, torch.Tensor], Iterable[Any]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
        return self.x

    @property
    def scales(self) -> torch.Tensor:
        return self.x

    @property
    def accuracy_per_repeat(self) -> torch.Tensor:
        return self.correct / self.count

    @property
    def loss_per_repeat(self) -> torch.Tensor:
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
        if isinstance(batch, collections.abc.Mapping):
            keys = list(batch)
            batch = (next((batch[k] for k in INPUT_KEYS if k in batch), None), next((batch[k] for k in TARGET_KEYS if k in batch), None))
            if batch[0] is None or batch[1] is None:
                raise ValueError(
                    f"Cannot find inputs and targets in a batch dict with keys {keys}: expected one of {list(INPUT_KEYS)} "
                    f"and one of {list(TARGET_KEYS)}. Pass (inputs, targets) batches instead."
                )
        if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not all(isinstance(t, torch.Tensor) for t in batch[:2]):
            raise TypeError(
                "Expected each batch of `data` to be an (inputs, targets) pair of tensors, but got "
                f"{type(batch).__name__}."
            )
        _check_targets(batch[0], batch[1])
        yield batch[0], batch[1]


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
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"Expected `max_batch` to be a positive int, but got {max_batch!r}.")
    if max_elements is not None and max_elements != "auto" and (
        not isinstance(max_elements, int) or isinstance(max_elements, bool) or max_elements < 1
    ):
        raise ValueError(f"Expected `max_elements` to be a positive int, 'auto' or None, but got {max_elements!r}.")


def _max_elements(max_elements: MaxElements, device: Optional[torch.device]) -> Optional[int]:
    if max_elements != "auto":
        return max_elements  # type: ignore[return-value]
    return DEFAULT_MAX_ELEMENTS["cpu" if device is None or device.type == "cpu" else "other"]


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


def _tensors_in(out: Any) -> List[torch.Tensor]:
    """The tensors of a module output: itself, or those in a tuple/list, a dict-like or a dataclass."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        items: Iterable[Any] = out
    elif isinstance(out, collections.abc.Mapping) or (hasattr(out, "keys") and hasattr(out, "__getitem__")):
        items = [out[k] for k in out.keys()]
    elif dataclasses.is_dataclass(out):
        items = [getattr(out, f.name) for f in dataclasses.fields(out)]
    else:
        return []
    return [t for t in items if isinstance(t, torch.Tensor)]


#: rows of the first batch that the shape pass runs when no statistic over the data is needed
_SHAPE_ROWS = 8


class _LayerStats:
    """One pass over the data: unit count, per-unit mean/std (over samples and positions), selectivity inputs."""

    def __init__(self) -> None:
        self.ud: Optional[int] = None  # unit dim once the batch dim is moved first
        self.bd = 0  # batch dim of the layer's output
        self.d = 0
        self.n = 0
        self.s1: Optional[torch.Tensor] = None
        self.s2: Optional[torch.Tensor] = None
        self.cnt = 0
        self.unit_means: List[torch.Tensor] = []  # per-sample per-unit means (for selectivity)
        self.labels: List[torch.Tensor] = []
        self.calls = 0  # hook calls (to catch a module that runs more than once per forward)
        self.row_elements = 1  # elements per input row of the largest module output (first batch)


def _layer_pass(model: nn.Module, module: nn.Module, data: Data, device, keep_rows: bool, first_only: bool = False, *,
                name: str = "?", layout: Optional[str] = None, select: Any = None, observe: Observe = True) -> _LayerStats:
    """Unit count and layout, per-unit statistics; with ``first_only``, from the first
    ``_SHAPE_ROWS`` rows of the first non-empty batch (enough for the shape, the largest output per
    row and the one-call check, when no statistic over all the data is needed)."""
    st = _LayerStats()

    layouts = Layouts(model, {name: module}, layout, select={name: select}, observe=observe)

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        if observing():
            return
        out, primary, _ = select_output(output, select, name, require=True)
        st.calls += 1
        bd, ud0 = layouts.dims(name, mod, out, primary=primary)
        if out.ndim < 2:
            raise ValueError(f"Layer {name!r} returned {tuple(out.shape)}: no unit axis to ablate.")
        ud = ud0 + 1 if ud0 < bd else ud0  # once the batch dim is moved first
        o = out.detach().to(_F64).movedim((bd, ud0), (0, -1))
        d = o.shape[-1]
        flat = o.reshape(-1, d)
        if st.s1 is None:
            st.ud, st.d, st.bd = ud, d, bd
            st.s1 = torch.zeros(d, dtype=_F64, device=o.device)
            st.s2 = torch.zeros(d, dtype=_F64, device=o.device)
        st.s1 += flat.sum(0)
        st.s2 += (flat * flat).sum(0)
        st.cnt += flat.shape[0]
        if keep_rows:
            st.unit_means.append(o.reshape(o.shape[0], -1, d).mean(1))

    rows = [0]

    def size_hook(mod: nn.Module, args: Any, out: Any) -> None:
        if observing():
            return
        # the stacked passes hold every module output at m * b rows: their memory is bounded by
        # the largest output per input row (a tuple's tensors together)
        elems = sum(t.numel() for t in _tensors_in(out))
        st.row_elements = max(st.row_elements, -(-elems // max(rows[0], 1)))

    h = module.register_forward_hook(hook)
    layouts_h: List[Any] = []
    sizes: List[Any] = []
    try:
        layouts_h = layouts.attach()
        sizes = [m.register_forward_hook(size_hook) for m in model.modules()]
        for x, y in _batches(data):
            if first_only and x.shape[0]:
                x, y = x[:_SHAPE_ROWS], y[:_SHAPE_ROWS]
            x = x.to(device) if device is not None else x
            rows[0] = x.shape[0]
            model(x)
            if x.shape[0] and sizes:
                for handle in sizes:
                    handle.remove()
                sizes = []
            if st.n == 0 and st.calls > 1:
                raise ValueError(
                    f"The layer runs {st.calls} times in one forward pass (one module instance used at several "
                    "places, e.g. a shared nn.ReLU), so ablating it would hit every call site. Give the site you "
                    "want its own module instance."
                )
            st.n += x.shape[0]
            if keep_rows:
                st.labels.append(y.to(x.device))
            if first_only and st.s1 is not None:
                break
    finally:
        h.remove()
        for handle in layouts_h + sizes:
            handle.remove()
    if st.s1 is None:
        raise ValueError("The layer was never reached by a forward pass over `data` (empty data, or the layer is unused).")
    return st


def _reduce_stats(st: _LayerStats) -> None:
    """Sum the per-unit sums over ranks (no-op without torch.distributed)."""
    if _dist.is_distributed():
        flat = _dist.all_reduce_sum(torch.cat([st.s1, st.s2, torch.tensor([float(st.cnt)], dtype=_F64, device=st.s1.device)]))  # type: ignore[list-item]
        d = st.d
        st.s1, st.s2, st.cnt = flat[:d], flat[d : 2 * d], int(flat[-1])


_MIN_SUB = 16


class _MaskingHook:
    """Applies ``m`` masks/perturbations to an output of ``m * b`` rows (m repeated batches): to the
    ``select``-ed tensor of the output (the rest passes through), with its batch dim ``bd`` moved
    first for ``fn`` and back after."""

    def __init__(self, bd: int = 0, select: Any = None, name: str = "?") -> None:
        self.bd, self.select, self.name = bd, select, name
        self.fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def __call__(self, mod: nn.Module, args: Any, output: Any) -> Any:
        if self.fn is None:
            return None
        out, _, rebuild = select_output(output, self.select, self.name, require=True)
        if self.bd:
            return rebuild(self.fn(out.movedim(self.bd, 0)).movedim(0, self.bd))
        return rebuild(self.fn(out))


def _run(
    model: nn.Module, module: nn.Module, data: Data, device, ud: int, n_masks: int,
    perturb: Callable[[torch.Tensor, int, int, int], torch.Tensor],
    loss_fn: Optional[LossFn], max_batch: int, vectorize: bool, expand: str = "auto",
    max_elements: Optional[int] = None, row_elements: int = 1, bd: int = 0, select: Any = None, name: str = "?",
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Evaluate ``n_masks`` perturbations; ``perturb(out_view (m, b, ...), start, m, first_sample_index)``.

    ``expand="layer"`` runs the layers before the perturbed one once per batch and repeats the
    layer's output ``m`` times inside the hook; ``"input"`` repeats the inputs (always valid for
    models that treat samples independently); ``"auto"`` tries ``"layer"`` and falls back to
    ``"input"`` for good if the model's output does not have ``m * b`` rows or a shape error is
    raised (e.g. a skip connection around the layer).
    """
    correct = torch.zeros(n_masks, dtype=_F64)
    loss_sum = torch.zeros(n_masks, dtype=_F64)
    n = 0
    hook = _MaskingHook(bd, select, name)
    h = module.register_forward_hook(hook)
    at_layer = expand in ("auto", "layer")
    # Every mask stacked in one pass over sub-batches of `sub` samples, so the layers before the
    # perturbed one run once per sample; only with more masks than the row budget are they
    # chunked. The budget: `max_batch` rows, and no module output above `max_elements` elements.
    budget = max_batch if max_elements is None else max(1, min(max_batch, max_elements // max(row_elements, 1)))
    if not vectorize:
        m_chunk, sub = 1, None
    else:
        sub = max(1, budget // n_masks)
        if sub < _MIN_SUB and budget >= 4 * _MIN_SUB:
            # at least `_MIN_SUB` samples per pass when the budget allows: with about as many masks
            # as the budget, passes of single samples through the whole model ran ~10x slower than
            # chunking the masks (the layers before the perturbed one then run once per chunk)
            sub = _MIN_SUB
        m_chunk = max(1, min(n_masks, budget // sub))
    try:
        for xb, yb in _batches(data):
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            if xb.shape[0] == 0:
                continue
            step = sub or xb.shape[0]
            for s0 in range(0, xb.shape[0], step):
                x, y = xb[s0 : s0 + step], yb[s0 : s0 + step]
                b, first = x.shape[0], n + s0
                for start in range(0, n_masks, m_chunk):
                    m = min(m_chunk, n_masks - start)
                    out = None
                    if at_layer and m > 1 and b > 1:
                        def fn_layer(o: torch.Tensor, start: int = start, m: int = m, b: int = b, first: int = first) -> torch.Tensor:
                            view = o.unsqueeze(0).expand(m, *o.shape)
                            return perturb(view, start, m, first).reshape(m * b, *o.shape[1:])

                        hook.fn = fn_layer
                        try:
                            out = model(x)
                            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != m * b:
                                raise RuntimeError("output rows do not follow the layer's rows")
                        except (RuntimeError, AssertionError):  # (torch's attention checks its mask's batch with assert)
                            if expand == "layer":
                                raise
                            at_layer, out = False, None  # fall back to repeating the inputs, for good
                    if out is None:
                        def fn(o: torch.Tensor, start: int = start, m: int = m, b: int = b, first: int = first) -> torch.Tensor:
                            view = o.reshape(m, b, *o.shape[1:])
                            return perturb(view, start, m, first).reshape(o.shape)

                        hook.fn = fn
                        xin = x.repeat(m, *([1] * (x.ndim - 1))) if m > 1 else x
                        out = model(xin)
                    _check_scores(out, y)
                    yy = y.repeat(m) if m > 1 else y
                    hit = (out.argmax(1) == yy).to(_F64).reshape(m, b).sum(1)
                    ls = _per_sample_loss(loss_fn, out, yy).to(_F64).reshape(m, b).sum(1)
                    correct[start : start + m] += hit.cpu()
                    loss_sum[start : start + m] += ls.cpu()
            n += xb.shape[0]
    finally:
        h.remove()
        hook.fn = None
    return correct, loss_sum, n


def _unit_shape(view: torch.Tensor, ud: int, m: int, d: int) -> List[int]:
    # view is (m, b, *rest); the unit dimension of the original output is `ud` -> rest index ud - 1
    shape = [m, 1] + [1] * (view.ndim - 2)
    shape[ud + 1] = d
    return shape


def _mask_perturb(masks: torch.Tensor, mean: Optional[torch.Tensor], ud: int, d: int
                  ) -> Callable[[torch.Tensor, int, int, int], torch.Tensor]:
    """The ``perturb`` of :func:`_run` that applies ``masks`` ``(n_masks, d)`` (1 keeps a unit, 0
    ablates it) to the stacked view ``(m, b, ...)``: ablated units set to 0 (``mean=None``) or to
    their ``mean`` ``(d,)``; ``ud``: the unit dim of the output once its batch dim is first."""
    cache: List[Optional[torch.Tensor]] = [None]

    def perturb(view: torch.Tensor, start: int, m: int, bi: int) -> torch.Tensor:
        if cache[0] is None or cache[0].device != view.device:
            cache[0] = masks.to(view.device)
        mk = cache[0][start : start + m].to(view.dtype).reshape(_unit_shape(view, ud, m, d))
        if mean is None:
            return view * mk
        fill = mean.to(view.device, view.dtype).reshape([1, 1] + [d if i == ud - 1 else 1 for i in range(view.ndim - 2)])
        return view * mk + fill * (1 - mk)

    return perturb


def selectivity_order(selectivity: torch.Tensor, *, descending: bool = True) -> torch.Tensor:
    """Unit order by class selectivity (``(d,)``, NaN = dead): most selective first when
    ``descending``; dead units last either way. Ties keep unit order."""
    key = torch.nan_to_num(selectivity.detach().cpu().double(), nan=-1.0 if descending else 2.0)
    return torch.argsort(key, descending=descending, stable=True)


def _selectivity_order(st: _LayerStats, descending: bool) -> torch.Tensor:
    from netprobe.metrics.selectivity import class_selectivity

    acts = torch.cat(st.unit_means)
    labels = torch.cat(st.labels).long()
    num_classes = int(labels.max()) + 1 if labels.numel() else 2
    sel = class_selectivity(acts, labels, num_classes=max(num_classes, 2)).values
    return selectivity_order(sel, descending=descending)


# ----------------------------------------------------------------------------- public API
def ablation_curve(
    model: nn.Module,
    layer: Union[str, nn.Module],
    data: Data,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    order: Union[str, torch.Tensor] = "random",
    mode: str = "zero",
    repeats: int = 3,
    generator: Optional[torch.Generator] = None,
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
) -> CurveResult:
    """Cumulative ablation curve of one layer (Morcos et al. 2018, "single directions").

    A growing fraction of the layer's units (channels of a conv output, the last dimension of a
    sequence output) is ablated, cumulatively in one order, and accuracy and loss are recorded at
    each fraction. ``round(f * d)`` units are ablated at fraction ``f``.

    Args:
        model: a classifier returning ``(batch, num_classes)`` scores.
        layer: qualified module name (``"encoder.relu2"``) or the submodule itself.
        data: an ``(inputs, targets)`` pair of tensors, or an iterable of such batches (a
            ``DataLoader``). Use the TRAINING data with the training labels (module docstring).
        fractions: ascending, in ``[0, 1]``, starting at 0 (default 0, 0.1, ..., 1).
        order: ``"random"`` (a new random order per repeat), ``"selectivity_desc"`` (most
            class-selective units first; dead units last), ``"selectivity_asc"`` (least selective
            first), or a permutation tensor of the ``d`` units, ``(d,)``, or a stack of
            permutations, ``(r, d)``, one curve per row (then ``repeats`` is ignored). Reusing the
            same orders at every epoch (common random numbers) makes the change of the curve
            between epochs reflect the network, not the draw.
        mode: ``"zero"`` (set to 0) or ``"mean"`` (set to the unit's mean over ``data``, and over
            positions for conv/sequence outputs).
        repeats: random orders averaged (``order="random"`` only).
        generator: source of the random orders; a fresh ``torch.Generator`` seeded with 0 when
            ``None`` (the global RNG is never used).
        loss_fn: ``loss_fn(outputs, targets) -> (batch,)`` per-sample losses; default cross-entropy.
        max_batch: most samples (rows) per forward pass when masks are stacked.
        max_elements: memory bound of a stacked pass: the rows per pass are also limited so that
            no module output of the model (the largest one per input row, measured on a few rows
            of the first batch; a tuple output's tensors together) holds more than
            ``max_elements`` elements. ``"auto"`` (default): ``2**18`` (1 MiB of float32 per
            tensor) for a model on the CPU, where larger stacks ran slower (they fall out of
            cache), ``2**21`` (8 MiB) on an accelerator; a stacked pass keeps a few such tensors
            alive at once. ``None``: rows alone (``max_batch``) bound the pass.
        vectorize: stack several masks per forward pass (default); ``False`` runs one pass per mask
            (same numbers, slower).
        distributed: ``data`` is this rank's shard of a dataset split across the ranks of
            ``torch.distributed``: the per-unit statistics (``mode="mean"``, selectivity orders) and
            the result are reduced across ranks, so every rank gets the curve of the whole data.
            Every rank must call with the same generator state. Ignored when not distributed.
        expand: how masks are stacked: ``"auto"`` (default) runs the layers before ``layer`` once
            per batch and repeats only the layer's output, falling back to ``"input"`` (repeat the
            inputs) when the model's structure does not allow it (e.g. a skip connection around
            the layer); ``"layer"`` or ``"input"`` force one way. All give the same numbers.
        unablated: ``(correct, loss_sum)`` of the model itself on ``data`` (this rank's ``data``
            with ``distributed``), when the caller has them from a forward pass it made anyway
            (:func:`score` of the outputs): the points that ablate no unit are then taken from
            them instead of being evaluated again. They must be the model's own numbers on
            exactly this data; the curve is wrong otherwise.
        layout: the layout of the layer's output (``"NC"``, ``"NCL"``, ``"NLC"``, ``"LNC"``,
            ``"NCHW"``, ``"NHWC"``, ...; ``N`` batch, ``C`` units): needed where netprobe cannot
            establish it (a ``ValueError`` then says so); the same decision as the probe's (see
            :class:`netprobe._modules.Layouts`), e.g. ``batch_first=False`` RNN and transformer
            outputs are ``"LNC"``. The inputs in ``data`` are batch first whatever the layer's layout.
        select: for a layer whose output is not one tensor (``nn.LSTM``, ``nn.MultiheadAttention``:
            a tuple; a dict or dataclass): the int index or key of the tensor to ablate; the rest
            of the output passes through unchanged. Required for such layers.
        observe: the layer's batch axis is observed by first running the model on a few rows at two
            batch sizes (see :class:`netprobe._modules.Layouts`); pass a
            :class:`netprobe.LayoutDecisions` to keep and reuse that decision across
            calls, or ``False`` to trust ``layout=`` (default: batch first) without running again.

    Returns:
        :class:`CurveResult` with ``fractions``, ``accuracy``, ``loss`` and ``auc`` (1.0 = no
        degradation; above 1 when ablation happens to help, which for a network near chance,
        whose unablated accuracy is tiny, can reach 2 or more: read it beside that accuracy).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> r = ablation_curve(net, "1", (x, y), generator=torch.Generator().manual_seed(0))
        >>> r.fractions.shape, r.accuracy.shape, float(r.accuracy[0]) == float((net(x).argmax(1) == y).double().mean())
        (torch.Size([11]), torch.Size([11]), True)
    """
    name, module = resolve_layer(model, layer)
    fr = _check_points(fractions, "fractions", 0.0, 1.0)
    if mode not in ("zero", "mean"):
        raise ValueError(f"Expected `mode` to be 'zero' or 'mean', but got {mode!r}.")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"Expected `repeats` to be an int >= 1, but got {repeats!r}.")
    _check_budget(max_batch, max_elements)
    if expand not in ("auto", "layer", "input"):
        raise ValueError(f"Expected `expand` to be 'auto', 'layer' or 'input', but got {expand!r}.")
    if isinstance(order, str) and order not in ("random", "selectivity_desc", "selectivity_asc"):
        raise ValueError(
            f"Expected `order` to be 'random', 'selectivity_desc', 'selectivity_asc' or a permutation tensor, but got {order!r}."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"Expected `generator` to be a torch.Generator, but got {type(generator).__name__}.")
    _check_reiterable(data)
    layout = check_layout(layout) if layout is not None else None
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = _model_device(model)
    with evaluating(model, restore_rng=True):
        by_selectivity = isinstance(order, str) and order != "random"
        # statistics over all the data only for per-unit means or a selectivity order
        st = _layer_pass(model, module, data, device, keep_rows=by_selectivity, first_only=not (mode == "mean" or by_selectivity),
                         name=name, layout=layout, select=select, observe=observe)
        if distributed:
            _reduce_stats(st)
            if st.unit_means:
                st.unit_means = [_dist.all_gather_cat(torch.cat(st.unit_means))]
                st.labels = [_dist.all_gather_cat(torch.cat(st.labels))]
        d, ud = st.d, int(st.ud or 0)
        if isinstance(order, torch.Tensor):
            perm = order.detach().cpu().long()
            perm = perm[None] if perm.ndim == 1 else perm
            if perm.ndim != 2 or perm.shape[0] < 1 or perm.shape[1] != d or not torch.equal(perm.sort(1).values, torch.arange(d).expand_as(perm)):
                raise ValueError(
                    f"Expected `order` to be a permutation of the layer's {d} units, (d,), or a stack of them, "
                    f"(repeats, d), but got shape {tuple(order.shape)}" + ("." if perm.ndim == 2 and perm.shape[-1:] != (d,) else
                                                                          " with entries that are not a permutation.")
                )
            orders = perm
        elif order == "random":
            orders = torch.stack([torch.randperm(d, generator=gen, device=gen.device).cpu() for _ in range(repeats)])
        else:
            orders = _selectivity_order(st, descending=(order == "selectivity_desc"))[None]
        n_rep, k = orders.shape[0], fr.numel()
        n_ablate = torch.round(fr * d).long()
        # masks[r * k + j] keeps 1 for units not among the first n_ablate[j] of orders[r]
        rank = torch.empty_like(orders)
        rank.scatter_(1, orders, torch.arange(d).expand(n_rep, d))
        masks = (rank[:, None, :] >= n_ablate[None, :, None]).reshape(n_rep * k, d)
        mean = (st.s1 / st.cnt) if mode == "mean" else None

        # identical masks (fraction 0 in every repeat, fraction 1, repeated counts) are evaluated once
        uniq, inverse = torch.unique(masks, dim=0, return_inverse=True)
        nothing = uniq.all(1)  # masks that ablate no unit: the model itself
        given = unablated is not None and bool(nothing.any()) and not bool(nothing.all())
        masks = uniq[~nothing] if given else uniq
        perturb = _mask_perturb(masks, mean, ud, d)
        correct_e, loss_e, n = _run(model, module, data, device, ud, masks.shape[0], perturb, loss_fn, max_batch, vectorize, expand,
                                     _max_elements(max_elements, device), st.row_elements, st.bd, select, name)
        if given:
            correct_u = torch.empty(uniq.shape[0], dtype=_F64)
            loss_u = torch.empty(uniq.shape[0], dtype=_F64)
            correct_u[~nothing], loss_u[~nothing] = correct_e, loss_e
            correct_u[nothing], loss_u[nothing] = float(unablated[0]), float(unablated[1])  # type: ignore[index]
        else:
            correct_u, loss_u = correct_e, loss_e
        correct, loss_sum = correct_u[inverse], loss_u[inverse]
    res = CurveResult(fr, correct.reshape(n_rep, k), loss_sum.reshape(n_rep, k), n, "ablation", name, orders)
    return _check_finite_loss(_check_count(res.all_reduce() if distributed else res))  # after the reduce: every rank agrees


def noise_curve(
    model: nn.Module,
    layer: Union[str, nn.Module],
    data: Data,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    repeats: int = 3,
    generator: Optional[torch.Generator] = None,
    loss_fn: Optional[LossFn] = None,
    max_batch: int = 4096,
    max_elements: MaxElements = "auto",
    vectorize: bool = True,
    index_offset: int = 0,
    distributed: bool = False,
    expand: str = "auto",
    layout: Optional[str] = None,
    select: Union[int, str, None] = None,
    observe: Observe = True,
) -> CurveResult:
    """Noise-robustness curve of one layer: Gaussian noise of std ``scale * per-unit std`` added to
    its output, accuracy and loss recorded per scale (Morcos et al. 2018).

    The per-unit std is taken over ``data`` (and over positions for conv/sequence outputs). Within
    a repeat the same standard-normal draw is scaled for every scale (common random numbers, so
    the curve is smooth in the scale); repeats use independent draws from ``generator``. The draw of
    each sample depends only on the repeat and the sample's index, so splitting ``data`` into shards
    across ranks (with ``index_offset`` = the global index of a shard's first sample and
    ``distributed=True``, which takes the per-unit std over all ranks) gives exactly the unsharded
    curve. Without ``distributed=True`` each call scales the noise by its own data's std.

    Args:
        model: as in :func:`ablation_curve`.
        layer: as in :func:`ablation_curve`.
        data: as in :func:`ablation_curve`.
        repeats: as in :func:`ablation_curve`.
        generator: as in :func:`ablation_curve`.
        loss_fn: as in :func:`ablation_curve`.
        max_batch: as in :func:`ablation_curve`.
        max_elements: as in :func:`ablation_curve`.
        vectorize: as in :func:`ablation_curve`.
        scales: ascending, ``>= 0``, starting at 0.
        index_offset: global index of the first sample of ``data`` (for sharded evaluation).
        distributed: as in :func:`ablation_curve` (the per-unit std is taken over all ranks).
        expand: as in :func:`ablation_curve`.
        layout: as in :func:`ablation_curve`.
        select: as in :func:`ablation_curve`.
        observe: as in :func:`ablation_curve`.

    Returns:
        :class:`CurveResult` (``x`` are the scales; ``auc`` is normalized by the span of scales).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> r = noise_curve(net, "1", (x, y), scales=[0.0, 1.0, 2.0])
        >>> r.scales.tolist()
        [0.0, 1.0, 2.0]
    """
    name, module = resolve_layer(model, layer)
    sc = _check_points(scales, "scales", 0.0, None)
    _check_budget(max_batch, max_elements)
    if expand not in ("auto", "layer", "input"):
        raise ValueError(f"Expected `expand` to be 'auto', 'layer' or 'input', but got {expand!r}.")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"Expected `repeats` to be an int >= 1, but got {repeats!r}.")
    if not isinstance(index_offset, int) or isinstance(index_offset, bool) or index_offset < 0:
        raise ValueError(
            f"Expected `index_offset` to be an int >= 0 (the global index of the first sample of `data`), but got {index_offset!r}."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"Expected `generator` to be a torch.Generator, but got {type(generator).__name__}.")
    _check_reiterable(data)
    layout = check_layout(layout) if layout is not None else None
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = _model_device(model)
    with evaluating(model, restore_rng=True):
        st = _layer_pass(model, module, data, device, keep_rows=False, name=name, layout=layout, select=select,
                         observe=observe)
        if distributed:
            _reduce_stats(st)
        d, ud = st.d, int(st.ud or 0)
        mean = st.s1 / st.cnt
        std = (st.s2 / st.cnt - mean * mean).clamp_min(0).sqrt()
        k = sc.numel()
        seeds = torch.randint(0, 2**62, (repeats,), generator=gen, device=gen.device).tolist()
        noise_cache: dict = {}

        def z_for(rep: int, first: int, shape: torch.Size, dev: torch.device) -> torch.Tensor:
            key = (rep, first)
            if key not in noise_cache:
                noise_cache.clear()
                draws = []
                for i in range(shape[0]):  # one generator per (repeat, global sample index)
                    g = torch.Generator().manual_seed((int(seeds[rep]) + 1_000_003 * (index_offset + first + i)) % (2**63 - 1))
                    draws.append(torch.randn(shape[1:], generator=g, dtype=torch.float32))
                noise_cache[key] = torch.stack(draws).to(dev)
            return noise_cache[key]

        def perturb(view: torch.Tensor, start: int, m: int, first: int) -> torch.Tensor:
            out = view.clone()
            s = std.to(view.device, view.dtype).reshape([d if i == ud - 1 else 1 for i in range(view.ndim - 2)])
            for i in range(m):
                rep, j = divmod(start + i, k)
                if float(sc[j]) == 0.0:
                    continue
                out[i] = view[i] + float(sc[j]) * s * z_for(rep, first, view.shape[1:], view.device).to(view.dtype)
            return out

        correct, loss_sum, n = _run(model, module, data, device, ud, repeats * k, perturb, loss_fn, max_batch, vectorize, expand,
                                  _max_elements(max_elements, device), st.row_elements, st.bd, select, name)
    res = CurveResult(sc, correct.reshape(repeats, k), loss_sum.reshape(repeats, k), n, "noise", name, None)
    return _check_finite_loss(_check_count(res.all_reduce() if distributed else res))
