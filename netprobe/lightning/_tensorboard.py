"""What the monitors write to TensorBoard besides scalars: the custom-scalars layout and the
HParams experiment (once per run and writer, rank zero), and how a Trainer's TensorBoard writer
is found."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe._keys import BEST_TRACKED as _BEST
from netprobe.lightning._shared_pass import _shared_pass

if TYPE_CHECKING:  # pragma: no cover
    from netprobe.lightning._shared_pass import Trainer


def _hparams_of(trainer: Trainer, pl_module: nn.Module) -> Dict[str, Any]:
    """The module's (and datamodule's) hyperparameters, flattened (``a/b``) to the scalar types
    TensorBoard's HParams plugin takes (others as their ``str``)."""
    params: Dict[str, Any] = {}
    for src in (getattr(pl_module, "hparams", None), getattr(getattr(trainer, "datamodule", None), "hparams", None)):
        if isinstance(src, Mapping):
            params.update(src)
    flat: Dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, w in v.items():
                walk(f"{prefix}/{k}" if prefix else str(k), w)
        elif isinstance(v, (bool, int, float, str)):
            flat[prefix] = v
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            flat[prefix] = v.item()
        else:
            flat[prefix] = str(v)

    walk("", params)
    return flat


def custom_scalars_layout(metrics: Sequence[str]) -> Dict[str, Dict[str, List[Any]]]:
    """TensorBoard custom-scalars layout: one chart per metric with a line per layer, the mean and
    the best so far (``netprobe/<metric>``, ``netprobe/<metric>/<layer>``, ``netprobe/best/<metric>``),
    and one chart of the monitors' seconds per measurement."""
    import re

    charts = {m: ["Multiline", [rf"^netprobe/(best/)?{re.escape(m)}(/.*)?$"]] for m in dict.fromkeys(metrics)}
    return {"netprobe": charts, "netprobe time": {"seconds per measurement": ["Multiline", [r"^netprobe/time/"]]}}


def _register_tensorboard(trainer: Trainer, pl_module: nn.Module, mons: Sequence[Any]) -> None:
    """Write, once per run and writer, the custom-scalars layout of every netprobe monitor of the
    Trainer (``mons``, in the Trainer's order) and an HParams experiment whose metrics are their keys (rank zero, TensorBoardLogger)."""
    if _dist.rank() != 0:
        return
    writer = _tensorboard_writer(list(getattr(trainer, "loggers", []) or []))
    if writer is None or not hasattr(writer, "_get_file_writer"):
        return
    keys = [k for m in mons for k in m.logged_keys(pl_module) if not k.startswith(("netprobe/time/", "netprobe/layer_index/", "netprobe/layer_units/"))]
    shared = _shared_pass(trainer)
    sig = (id(writer), tuple(keys))
    if shared.tensorboard_written == sig:
        return
    shared.tensorboard_written = sig
    try:
        from torch.utils.tensorboard.summary import hparams
    except ImportError:  # pragma: no cover - tensorboardX-only writers
        return
    writer.add_custom_scalars(custom_scalars_layout([m for c in mons for m in c.metrics]))
    # TensorBoard shows the first few metrics: the means and bests first, reliance leading
    family = {m: i for i, m in enumerate(_BEST)}

    def order(key: str) -> Tuple[int, int, str]:
        parts = key.split("/")
        metric = parts[2] if parts[1] == "best" else parts[1]
        per_layer = int(parts[1] != "best" and len(parts) > 2)
        return per_layer, family.get(metric, len(family)), key

    metric_keys = sorted(dict.fromkeys(keys), key=order)
    exp, ssi, sei = hparams(_hparams_of(trainer, pl_module), {k: 0.0 for k in metric_keys})
    fw = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        fw.add_summary(summary)


def _tensorboard_writer(loggers: Sequence[Any]) -> Optional[Any]:
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            exp = logger.experiment
            if hasattr(exp, "add_histogram") and hasattr(exp, "add_figure"):
                return exp
    return None
def _has_tensorboard(trainer: Trainer) -> bool:
    return any(type(lg).__name__ == "TensorBoardLogger" for lg in (getattr(trainer, "loggers", None) or []))
