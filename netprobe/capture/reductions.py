"""Turning a layer's output into ``(n, d)`` rows: the reductions a probe applies in its hook.

* ``"mean"`` (default): 2-D ``(N, D)`` unchanged; convolutional ``(N, C, ...)`` -> per-channel mean
  over the spatial dimensions; sequences ``(N, T, D)`` -> mean over ``T``.
* ``"flatten"``: ``output.flatten(1)``, every element a unit.
* ``"last"``: sequences ``(N, T, D)`` -> ``output[:, -1]``.
* ``"sample"``: ``positions`` positions drawn per input (spatial positions of a conv output, time
  steps of a sequence), each a row: ``(N * positions, C or D)``, rows of one input adjacent. The
  positions are distinct within an input and drawn from the probe's ``torch.Generator``.

  **Rows line up across layers only between layers of the same spatial size.** Within one forward
  pass of the model, a probe draws the positions once for each grid size ``(N, P)`` (``N`` inputs,
  ``P`` positions per input) and every ``"sample"`` layer with that size uses the same draw: row
  ``i`` is the same input and the same position in each of them (two 8x8 conv layers, a layer and
  the activation after it), so comparing them row by row (CKA, CCA) is meaningful. The next forward
  pass draws anew. Layers of different spatial sizes (an 8x8 and a 4x4 layer) get independent
  draws: their rows are the same inputs but unrelated positions, and a row-wise similarity between
  them measures nothing; compare such layers with ``reduce="mean"`` (or resample them to one size
  yourself, with a callable reduction).
* a callable ``f(output) -> (n, d)``.

Which dimension holds the batch and which the units is decided by :class:`netprobe.layers.Layouts`
(passed in as ``dims=(batch_dim, unit_dim)``); rows are always the batch items, in batch order.
A sequence-first ``(T, N, D)`` output (``layout="LNC"``, or an RNN/transformer with
``batch_first=False``) gives the same rows as its ``(N, T, D)`` transpose.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from netprobe.layers import unit_dim

__all__ = ["Reduction", "REDUCTIONS", "check_reduction", "reduce_output"]

Reduction = Union[str, Callable[[torch.Tensor], torch.Tensor]]
REDUCTIONS = ("mean", "flatten", "last", "sample")


def check_reduction(reduce: object, where: str = "reduce") -> Reduction:
    """The reduction ``reduce`` after checking it is one of the named reductions or a callable; ``ValueError`` naming the choices otherwise."""
    if callable(reduce) and not isinstance(reduce, str):
        return reduce  # type: ignore[return-value]
    if reduce not in REDUCTIONS:
        raise ValueError(
            f"Expected `{where}` to be one of {list(REDUCTIONS)} or a callable output -> (n, d), "
            f"but got {reduce!r}."
        )
    return reduce  # type: ignore[return-value]


def reduce_output(
    module: nn.Module,
    out: torch.Tensor,
    reduce: Reduction,
    *,
    positions: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    layer: str = "?",
    dims: Optional[Tuple[int, int]] = None,
    draws: Optional[Dict[tuple, torch.Tensor]] = None,
) -> torch.Tensor:
    """Reduce one layer output to ``(n, d)`` rows (detached; no autograd graph).

    ``dims``: ``(batch_dim, unit_dim)`` of ``out`` (from :class:`netprobe.layers.Layouts`);
    ``None``: batch first, units by :func:`netprobe.layers.unit_dim`.

    ``draws``: for ``"sample"``, the position indices already drawn for this forward pass, keyed by
    ``(N, P, positions)`` (and by the device for their copies there); a grid size found in it reuses
    those positions (the rows line up with the layers that drew them), one not found is drawn from
    ``generator`` and added. ``None``: every call draws anew.
    """
    out = out.detach()
    if out.is_nested:
        from netprobe.layers import NESTED_MESSAGE

        raise ValueError(NESTED_MESSAGE.format(name=layer))
    if callable(reduce) and not isinstance(reduce, str):
        rows = reduce(out)
        if not isinstance(rows, torch.Tensor) or rows.ndim != 2:
            shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(
                f"The reduction callable for layer {layer!r} must return a 2-D (n, d) tensor, but returned {shape}."
            )
        return rows.detach()
    if out.ndim == 0:
        raise ValueError(f"Layer {layer!r} returned a scalar; there are no units to capture.")
    if out.ndim == 1:
        return out[:, None]
    bd, ud = dims if dims is not None else (0, unit_dim(module, out))
    if out.ndim == 2 and (bd, ud) == (1, 0):
        out, bd, ud = out.t(), 0, 1
    if out.ndim == 2:
        if reduce in ("last", "sample"):
            raise ValueError(
                f"Reduction {reduce!r} needs positions (a conv or sequence output), but layer {layer!r} "
                f"returned 2-D {tuple(out.shape)}; use 'mean' (or 'flatten')."
            )
        return out
    if reduce == "flatten":
        return out.movedim(bd, 0).flatten(1)
    seq = out.movedim((bd, ud), (0, -1))  # (N, *positions, U)
    if reduce == "mean":
        return seq.mean(dim=tuple(range(1, seq.ndim - 1)))
    if reduce == "last":
        if out.ndim != 3 or ud < 3 - bd - ud:  # channels before the position: (N, C, L)
            raise ValueError(
                f"Reduction 'last' is for sequence outputs (N, T, D) or (T, N, D), but layer {layer!r} "
                f"({type(module).__name__}) returned {tuple(out.shape)}; use 'mean' or 'sample'."
            )
        return seq[:, -1]
    # sample
    seq = seq.reshape(seq.shape[0], -1, seq.shape[-1])  # (N, P, U)
    n, p, u = seq.shape
    k = positions
    if k is None or k < 1:
        raise ValueError(f"Reduction 'sample' needs `positions` >= 1, but got {k!r}.")
    if k > p:
        raise ValueError(
            f"Reduction 'sample' asks for {k} positions per input, but layer {layer!r} has only {p} "
            f"(output {tuple(out.shape)}); lower `positions` to at most {p}."
        )
    idx = _positions(n, p, k, generator, seq.device, draws)  # (N, k)
    picked = torch.gather(seq, 1, idx[:, :, None].expand(n, k, u))  # (N, k, U)
    return picked.reshape(n * k, u)


def _positions(
    n: int, p: int, k: int, generator: Optional[torch.Generator], device: torch.device,
    draws: Optional[Dict[tuple, torch.Tensor]],
) -> torch.Tensor:
    """``(n, k)`` position indices on ``device``: k distinct positions of ``p`` per input, the k
    smallest of ``p`` uniform keys drawn on the generator's device (the CPU for a probe's own), then
    moved. Reused from ``draws`` when this grid size was drawn already (same pass), so every layer
    of one size samples the same positions; added to it otherwise."""
    key = (n, p, k)
    there = (n, p, k, device)
    if draws is not None:
        hit = draws.get(there)
        if hit is not None:
            return hit
    idx = draws.get(key) if draws is not None else None
    if idx is None:
        gdev = generator.device if generator is not None else torch.device("cpu")
        keys = torch.rand((n, p), generator=generator, device=gdev)
        idx = keys.topk(k, dim=1, largest=False).indices
        if draws is not None:
            draws[key] = idx
    moved = idx.to(device, non_blocking=True)
    if draws is not None:
        draws[there] = moved
    return moved
