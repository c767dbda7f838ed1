"""Cumulative ablation curves (Morcos et al. 2018): accuracy and loss as growing fractions of a
layer's units are set to zero (or their mean), in random, selectivity or given orders."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe._validation import check_choice, check_int
from netprobe.layers import (
    check_layout,
    evaluating,
    resolve_layer,
)
from netprobe.metrics.reliance._engine import _layer_pass, _LayerStats, _mask_perturb, _PassOptions, _reduce_stats, _run
from netprobe.metrics.reliance._inputs import (
    _F64,
    Data,
    LossFn,
    MaxElements,
    Observe,
    _check_budget,
    _check_count,
    _check_finite_loss,
    _check_points,
    _check_reiterable,
    _max_elements,
    _model_device,
)
from netprobe.metrics.reliance.result import CurveResult

__all__ = ["ablation_curve", "selectivity_order", "DEFAULT_FRACTIONS"]


DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))


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
            class-selective units first; dead units last), ``"selectivity_asc"``, or a permutation
            tensor ``(d,)`` or a stack ``(r, d)``, one curve per row (``repeats`` then ignored);
            the same orders every epoch (common random numbers) make changes the network's.
        mode: ``"zero"`` (set to 0) or ``"mean"`` (the unit's mean over ``data`` and positions).
        repeats: random orders averaged (``order="random"`` only).
        generator: source of the random orders; ``None``: a ``torch.Generator`` seeded with 0
            (the global RNG is never used).
        loss_fn: ``loss_fn(outputs, targets) -> (batch,)`` per-sample losses; default cross-entropy.
        max_batch: most rows per forward pass when masks are stacked.
        max_elements: most elements of any module output of a stacked pass (per input row,
            measured on a few rows of the first batch); ``"auto"``: :data:`DEFAULT_MAX_ELEMENTS`
            (CPU ``2**18``, accelerator ``2**21``; docs/reliance.md); ``None``: rows alone.
        vectorize: stack several masks per pass (default); ``False``: one pass per mask, same numbers.
        distributed: ``data`` is this rank's shard under ``torch.distributed``: statistics and the
            result are reduced across ranks (every rank gets the whole data's curve; every rank
            must pass the same generator state). Ignored when not distributed.
        expand: ``"auto"`` runs the layers before ``layer`` once per batch and repeats only its
            output, falling back to ``"input"`` (repeat the inputs) where the model does not allow
            it (a skip around the layer); ``"layer"``/``"input"`` force one. Same numbers.
        unablated: ``(correct, loss_sum)`` of the model itself on exactly this ``data`` (this
            rank's with ``distributed``; :func:`score` of outputs the caller has anyway): the
            points that ablate nothing are taken from them. Wrong numbers give a wrong curve.
        layout: the layer output's layout (``"NC"``, ``"NCL"``, ``"NLC"``, ``"LNC"``, ``"NCHW"``,
            ...), where netprobe cannot establish it (a ``ValueError`` says so); decided and
            checked as by the probe (:class:`netprobe.layers.Layouts`). ``data`` is batch first.
        select: the int index or key of the tensor to ablate in a layer whose output is a tuple,
            dict or dataclass (``nn.LSTM``, ``nn.MultiheadAttention``); the rest passes through.
        observe: observe the batch axis (``True``), reuse a :class:`netprobe.LayoutDecisions`, or
            ``False`` to trust ``layout=`` without running the model again (see :class:`~netprobe.layers.Layouts`).

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
    _check_ablation_options(mode, repeats, expand, order, generator)
    _check_budget(max_batch, max_elements)
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
        orders = _ablation_orders(order, st, repeats, gen)
        masks = _cumulative_masks(orders, fr, st.d)
        mean = (st.s1 / st.cnt) if mode == "mean" else None

        # identical masks (fraction 0 in every repeat, fraction 1, repeated counts) are evaluated once
        uniq, inverse = torch.unique(masks, dim=0, return_inverse=True)
        nothing = uniq.all(1)  # masks that ablate no unit: the model itself
        given = unablated is not None and bool(nothing.any()) and not bool(nothing.all())
        evaluated = uniq[~nothing] if given else uniq
        ud = int(st.ud or 0)
        perturb = _mask_perturb(evaluated, mean, ud, st.d)
        how = _PassOptions(device, loss_fn, max_batch, vectorize, expand, _max_elements(max_elements, device))
        correct_e, loss_e, n = _run(model, module, data, perturb, evaluated.shape[0], stats=st, how=how, select=select, name=name)
        if given:
            correct_u = torch.empty(uniq.shape[0], dtype=_F64)
            loss_u = torch.empty(uniq.shape[0], dtype=_F64)
            correct_u[~nothing], loss_u[~nothing] = correct_e, loss_e
            correct_u[nothing], loss_u[nothing] = float(unablated[0]), float(unablated[1])  # type: ignore[index]
        else:
            correct_u, loss_u = correct_e, loss_e
        correct, loss_sum = correct_u[inverse], loss_u[inverse]
    n_rep, k = orders.shape[0], fr.numel()
    res = CurveResult(fr, correct.reshape(n_rep, k), loss_sum.reshape(n_rep, k), n, "ablation", name, orders)
    return _check_finite_loss(_check_count(res.all_reduce() if distributed else res))  # after the reduce: every rank agrees


def _check_ablation_options(mode: str, repeats: int, expand: str, order: Any, generator: Any) -> None:
    """``ablation_curve``'s option checks (before any forward pass)."""
    check_choice(mode, "mode", ("zero", "mean"))
    check_int(repeats, "repeats", 1)
    check_choice(expand, "expand", ("auto", "layer", "input"))
    if isinstance(order, str) and order not in ("random", "selectivity_desc", "selectivity_asc"):
        raise ValueError(
            f"Expected `order` to be 'random', 'selectivity_desc', 'selectivity_asc' or a permutation tensor, but got {order!r}."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"Expected `generator` to be a torch.Generator, but got {type(generator).__name__}.")


def _ablation_orders(order: Union[str, torch.Tensor], st: _LayerStats, repeats: int, gen: torch.Generator) -> torch.Tensor:
    """The unit orders, ``(r, d)``: the given permutation(s) (checked), ``repeats`` random ones drawn
    from ``gen``, or the selectivity order of ``st``."""
    d = st.d
    if isinstance(order, torch.Tensor):
        perm = order.detach().cpu().long()
        perm = perm[None] if perm.ndim == 1 else perm
        if perm.ndim != 2 or perm.shape[0] < 1 or perm.shape[1] != d or not torch.equal(perm.sort(1).values, torch.arange(d).expand_as(perm)):
            raise ValueError(
                f"Expected `order` to be a permutation of the layer's {d} units, (d,), or a stack of them, "
                f"(repeats, d), but got shape {tuple(order.shape)}" + ("." if perm.ndim == 2 and perm.shape[-1:] != (d,) else
                                                                      " with entries that are not a permutation.")
            )
        return perm
    if order == "random":
        return torch.stack([torch.randperm(d, generator=gen, device=gen.device).cpu() for _ in range(repeats)])
    return _selectivity_order(st, descending=(order == "selectivity_desc"))[None]


def _cumulative_masks(orders: torch.Tensor, fractions: torch.Tensor, d: int) -> torch.Tensor:
    """``(r * k, d)`` keep-masks: row ``r * k + j`` is 1 for the units not among the first
    ``round(fractions[j] * d)`` of ``orders[r]``."""
    n_rep = orders.shape[0]
    n_ablate = torch.round(fractions * d).long()
    rank = torch.empty_like(orders)
    rank.scatter_(1, orders, torch.arange(d).expand(n_rep, d))
    return (rank[:, None, :] >= n_ablate[None, :, None]).reshape(n_rep * fractions.numel(), d)
