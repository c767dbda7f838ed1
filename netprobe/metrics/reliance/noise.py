"""Noise-robustness curves (Morcos et al. 2018): accuracy and loss as Gaussian noise of growing
scale (relative to each unit's standard deviation) is added to a layer's units."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from netprobe._validation import check_choice, check_int
from netprobe.layers import (
    check_layout,
    evaluating,
    resolve_layer,
)
from netprobe.metrics.reliance._engine import _layer_pass, _PassOptions, _reduce_stats, _run
from netprobe.metrics.reliance._inputs import (
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

__all__ = ["noise_curve", "DEFAULT_SCALES"]


DEFAULT_SCALES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


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
    check_choice(expand, "expand", ("auto", "layer", "input"))
    check_int(repeats, "repeats", 1)
    check_int(index_offset, "index_offset", 0, " (the global index of the first sample of `data`)")
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

        how = _PassOptions(device, loss_fn, max_batch, vectorize, expand, _max_elements(max_elements, device))
        correct, loss_sum, n = _run(model, module, data, perturb, repeats * k, stats=st, how=how, select=select, name=name)
    res = CurveResult(sc, correct.reshape(repeats, k), loss_sum.reshape(repeats, k), n, "noise", name, None)
    return _check_finite_loss(_check_count(res.all_reduce() if distributed else res))
