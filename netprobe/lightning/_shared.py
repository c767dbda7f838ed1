"""Pieces the monitors share: the adapter through which the metric functions call a monitor's
``forward``, the check that the model returns class scores, and class selectivity over the
probe set (reduced across ranks)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from netprobe.lightning.base import NetprobeMonitor
from netprobe.metrics.selectivity import SelectivityAccumulator, SelectivityResult


def _check_class_scores(who: str, mon: NetprobeMonitor, out: Optional[torch.Tensor]) -> None:
    """Ablation scores accuracy and loss: the model must return (batch, num_classes) class scores."""
    if out is None or out.ndim != 2 or out.shape[1] < 2:
        got = "not a tensor (a tuple or dict?)" if out is None else f"of shape {tuple(out.shape)}"
        raise ValueError(
            f"{who}: accuracy under ablation needs the model to return class scores (batch, num_classes) "
            f"with at least 2 classes, but its output is {got}. Override `forward(pl_module, x)` in a subclass to "
            "return the scores (for a single binary logit z: `torch.cat([-z, z], 1)`)."
        )
    assert mon._probe is not None
    top = int(mon._probe[1].max()) if mon._probe[1].numel() else 0
    if top >= out.shape[1]:
        raise ValueError(f"{who}: probe targets reach class {top}, but the model returns {out.shape[1]} scores.")

#: the metrics a failed selectivity leaves without the layer's value (importance's rho needs it too)
_SELECTIVITY_SKIP = ("selectivity_mean", "dead_fraction", "importance_selectivity_rho", "importance_mi_rho")


def _probe_selectivity(mon: NetprobeMonitor, acts: torch.Tensor, labels: torch.Tensor) -> SelectivityResult:
    """Class selectivity over the whole probe set (this rank's shard, reduced across ranks); the
    shard's input checks are agreed across ranks first, so a failure skips the layer everywhere."""
    labels = labels.to(acts.device)
    acc = mon._agreed(lambda: SelectivityAccumulator(mon.num_classes).update(acts, labels), acts.device)  # type: ignore[arg-type]
    return acc.all_reduce().compute()


class _ForwardAdapter(nn.Module):
    """Lets the metric functions call the monitor's ``forward(pl_module, x)``; the monitored
    layers are reached as ``module.<name>``."""

    def __init__(self, monitor: NetprobeMonitor, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        object.__setattr__(self, "_monitor", monitor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._monitor.forward(self.module, x)  # type: ignore[attr-defined]
