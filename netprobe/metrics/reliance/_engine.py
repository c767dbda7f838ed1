"""The stacked evaluation shared by the ablation and noise curves and unit importance: one pass
that measures a layer's statistics (means, per-unit selectivity inputs), and passes in which a
batch of inputs is repeated ``m`` times with ``m`` different masks or perturbations applied at
the layer, bounded by ``max_batch`` and ``max_elements``."""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe.layers import (
    Layouts,
    observing,
    select_output,
)
from netprobe.metrics.reliance._inputs import _F64, Data, LossFn, Observe, _batches, _check_scores
from netprobe.metrics.reliance.result import _per_sample_loss

__all__: list = []




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
        # elements per input row of the largest module output (first batch): of the modules whose
        # forward ends after the layer's (they hold the stacked rows with expand="layer"), and of
        # those that end before it (they run once per sample then)
        self.row_elements = 1
        self.row_elements_before = 1

    def stacked_row_elements(self, at_layer: bool) -> int:
        """Elements per input row that the modules holding the stacked rows may reach: those after
        the layer with the masks applied at it (``at_layer``), every module with repeated inputs."""
        return self.row_elements if at_layer else max(self.row_elements, self.row_elements_before)


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
        # a stacked pass holds the outputs of the modules after the layer at m * b rows (those
        # before it at b rows, or at m * b with repeated inputs): its memory is bounded by the
        # largest output per input row on each side (a tuple's tensors together)
        elems = -(-sum(t.numel() for t in _tensors_in(out)) // max(rows[0], 1))
        if st.calls:  # the layer's own hook has run: this output is computed from the layer's
            st.row_elements = max(st.row_elements, elems)
        else:
            st.row_elements_before = max(st.row_elements_before, elems)

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


@dataclasses.dataclass(frozen=True)
class _PassOptions:
    """How a curve's stacked passes run (the options every curve function takes).

    Attributes:
        device: where the inputs go (the model's device), or ``None`` to leave them.
        loss_fn: per-sample loss, ``None`` for cross-entropy.
        max_batch: most rows per pass.
        vectorize: stack several perturbations per pass (``False``: one pass each).
        expand: ``"auto"``, ``"layer"`` or ``"input"`` (see :func:`_run`).
        max_elements: the element bound of any module output in a pass, or ``None``.
    """

    device: Optional[torch.device]
    loss_fn: Optional[LossFn]
    max_batch: int
    vectorize: bool
    expand: str
    max_elements: Optional[int]


def _chunking(budget: int, n_masks: int, vectorize: bool) -> Tuple[int, Optional[int]]:
    """``(perturbations per pass, samples per pass or None for whole batches)`` within ``budget`` rows."""
    if not vectorize:
        return 1, None
    sub = max(1, budget // n_masks)
    if sub < _MIN_SUB and budget >= 4 * _MIN_SUB:
        # at least `_MIN_SUB` samples per pass when the budget allows: passes of single samples
        # through the whole model are much slower than chunking the masks (the layers before the
        # perturbed one then run once per chunk)
        sub = _MIN_SUB
    return max(1, min(n_masks, budget // sub)), sub


def _run(
    model: nn.Module, module: nn.Module, data: Data, perturb: Callable[[torch.Tensor, int, int, int], torch.Tensor],
    n_masks: int, *, stats: _LayerStats, how: _PassOptions, select: Any = None, name: str = "?",
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Evaluate ``n_masks`` perturbations; ``perturb(out_view (m, b, ...), start, m, first_sample_index)``.

    ``expand="layer"`` runs the layers before the perturbed one once per batch and repeats the
    layer's output ``m`` times inside the hook; ``"input"`` repeats the inputs (always valid for
    models that treat samples independently); ``"auto"`` tries ``"layer"`` and falls back to
    ``"input"`` for good if the model's output does not have ``m * b`` rows or a shape error is
    raised (e.g. a skip connection around the layer).
    """
    hook = _MaskingHook(stats.bd, select, name)
    h = module.register_forward_hook(hook)
    try:
        if how.expand in ("auto", "layer"):
            done = _passes(model, data, perturb, n_masks, hook, how, stats, at_layer=True)
            if done is not None:
                return done
        # "input", or "auto" after a stacked pass at the layer failed: every module sees the stacked rows
        done = _passes(model, data, perturb, n_masks, hook, how, stats, at_layer=False)
        assert done is not None
        return done
    finally:
        h.remove()
        hook.fn = None


def _pass_shape(how: _PassOptions, stats: _LayerStats, n_masks: int, at_layer: bool) -> Tuple[int, Optional[int]]:
    """``(perturbations per pass, samples per pass or None)`` of :func:`_passes`: at most
    ``max_batch`` stacked rows, and no module output above ``max_elements`` elements. With the masks
    applied at the layer, the modules after it hold ``m * sub`` rows and those before it ``sub``;
    with repeated inputs every module holds ``m * sub``."""
    if how.max_elements is None:
        return _chunking(how.max_batch, n_masks, how.vectorize)
    per_row = stats.stacked_row_elements(at_layer)
    budget = max(1, min(how.max_batch, how.max_elements // max(per_row, 1)))
    m_chunk, sub = _chunking(budget, n_masks, how.vectorize)
    if at_layer and sub is not None:
        cap = max(1, how.max_elements // max(stats.row_elements_before, 1))
        if sub > cap:
            sub = cap
            m_chunk = max(1, min(n_masks, budget // sub))
    return m_chunk, sub


def _passes(model: nn.Module, data: Data, perturb: Callable[[torch.Tensor, int, int, int], torch.Tensor], n_masks: int,
            hook: _MaskingHook, how: _PassOptions, stats: _LayerStats, *, at_layer: bool,
            ) -> Optional[Tuple[torch.Tensor, torch.Tensor, int]]:
    """The stacked passes of :func:`_run` with the masks applied at the layer (``at_layer``) or to
    repeated inputs: ``(correct, loss sums, samples)``; ``None`` when a pass at the layer failed
    with ``expand="auto"`` (the caller starts again with repeated inputs)."""
    correct = torch.zeros(n_masks, dtype=_F64)
    loss_sum = torch.zeros(n_masks, dtype=_F64)
    n = 0
    device, expand, loss_fn = how.device, how.expand, how.loss_fn
    # Every mask stacked in one pass over sub-batches of `sub` samples, so the layers before the
    # perturbed one run once per sample; only with more masks than the row budget are they chunked.
    m_chunk, sub = _pass_shape(how, stats, n_masks, at_layer)
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
                        return None  # fall back to repeating the inputs, for good
                if out is None:  # repeated inputs: every module holds the stacked rows
                    out = _repeated_inputs(model, x, perturb, hook, start, m, first, _input_chunk(how, stats, m, b))
                _check_scores(out, y)
                yy = y.repeat(m) if m > 1 else y
                hit = (out.argmax(1) == yy).to(_F64).reshape(m, b).sum(1)
                ls = _per_sample_loss(loss_fn, out, yy).to(_F64).reshape(m, b).sum(1)
                correct[start : start + m] += hit.cpu()
                loss_sum[start : start + m] += ls.cpu()
        n += xb.shape[0]
    return correct, loss_sum, n


def _input_chunk(how: _PassOptions, stats: _LayerStats, m: int, b: int) -> int:
    """Masks per pass when ``m`` masks of ``b`` samples are evaluated on repeated inputs: all ``m``,
    unless the bound would be exceeded (a one-sample pass planned for masks at the layer, where the
    modules before the layer were bounded for one copy of the samples only)."""
    if how.max_elements is None:
        return m
    return max(1, min(m, how.max_elements // max(b * stats.stacked_row_elements(False), 1)))


def _repeated_inputs(model: nn.Module, x: torch.Tensor, perturb: Callable[[torch.Tensor, int, int, int], torch.Tensor],
                     hook: _MaskingHook, start: int, m: int, first: int, chunk: int) -> torch.Tensor:
    """The model's outputs ``(m * b, ...)`` for masks ``start .. start + m`` on ``x`` repeated, in
    passes of ``chunk`` masks (mask-major rows, as one pass would give them)."""
    b, outs = x.shape[0], []
    for s1 in range(start, start + m, chunk):
        mm = min(chunk, start + m - s1)

        def fn(o: torch.Tensor, start: int = s1, m: int = mm) -> torch.Tensor:
            view = o.reshape(m, b, *o.shape[1:])
            return perturb(view, start, m, first).reshape(o.shape)

        hook.fn = fn
        outs.append(model(x.repeat(mm, *([1] * (x.ndim - 1))) if mm > 1 else x))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


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
