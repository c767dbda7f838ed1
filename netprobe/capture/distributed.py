"""Gathering a probe's buffers across ranks (a thin layer over :mod:`netprobe.distributed`)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from netprobe import distributed as _dist
from netprobe.capture.probe import Probe

__all__ = ["gather"]


def gather(p: Probe, *, targets: bool = False) -> Dict[str, torch.Tensor] | Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Every probed layer's rows from all ranks, concatenated in rank order.

    Under ``torch.distributed`` (any backend whose collectives support the buffers' device: gloo
    for CPU, NCCL for CUDA) this is a collective: every rank must call it. Ranks may hold
    different numbers of rows. Without distributed it returns the local rows.

    Args:
        p: the probe.
        targets: also gather the targets (``store_targets=True``); values become ``(rows, targets)``.

    Returns:
        ``{layer: rows}`` or ``{layer: (rows, targets)}``.
    """
    out: Dict = {}
    for name in p.layers:
        rows = _dist.all_gather_cat(p[name])
        if targets:
            out[name] = (rows, _dist.all_gather_cat(p.targets(name)))
        else:
            out[name] = rows
    return out
