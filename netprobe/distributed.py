"""The one place where netprobe talks to ``torch.distributed``.

Every function is a no-op (returns its input, or a one-element list) when
``torch.distributed`` is not available or not initialized, so the same code runs
in a single process and under DDP. Collectives follow the device of the tensor
(gloo for CPU tensors, NCCL for CUDA tensors) as the process group allows.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "all_reduce_sum", "all_true", "require_all", "broadcast_object", "all_gather", "all_gather_cat"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialized with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes of ``torch.distributed`` (1 when it is not initialized)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in ``torch.distributed`` (0 when it is not initialized)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (a new tensor; ``t`` is left unchanged). No-op when not distributed."""
    if not is_distributed():
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_true(flag: bool, device: Optional[torch.device] = None) -> bool:
    """Whether ``flag`` holds on every rank (one small collective; ``flag`` itself when not
    distributed). ``device``: where the collective's tensor lives (a CUDA device under NCCL)."""
    if not is_distributed():
        return bool(flag)
    if device is None:  # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    bad = torch.tensor([0.0 if flag else 1.0], device=device)
    return bool(all_reduce_sum(bad).item() == 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def require_all(flag: bool, message: str, device: Optional[torch.device] = None) -> None:
    """Raise ``ValueError(message)`` on *every* rank when ``flag`` is false on any rank, so that no
    rank goes on to a collective the others will never join."""
    if not all_true(flag, device):
        raise ValueError(message if not flag else f"{message} (on another rank)")


def all_gather(t: torch.Tensor) -> List[torch.Tensor]:
    """Gather ``t`` from every rank, in rank order; ranks may hold different first dimensions.

    Returns ``[t]`` when not distributed.
    """
    if not is_distributed():
        return [t]
    t = t.contiguous()
    ws = dist.get_world_size()
    # exchange first-dimension sizes, pad to the largest, gather, then trim
    n = torch.tensor([t.shape[0] if t.ndim else 1], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    sizes_l = [int(s) for s in sizes]
    if t.ndim == 0:
        bufs = [torch.empty_like(t) for _ in range(ws)]
        dist.all_gather(bufs, t)
        return bufs
    m = max(sizes_l)
    padded = t
    if t.shape[0] < m:
        pad = torch.zeros((m - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        padded = torch.cat([t, pad])
    bufs = [torch.empty_like(padded) for _ in range(ws)]
    dist.all_gather(bufs, padded)
    return [b[:s] for b, s in zip(bufs, sizes_l)]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along the first dimension, in rank order."""
    parts = all_gather(t)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
