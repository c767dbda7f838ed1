"""What the monitors write to TensorBoard besides scalars: the custom-scalars layout, the HParams
session and experiment and ``hp_metric`` (rank zero, once per run and writer), and how a Trainer's
TensorBoard writer is found.

TensorBoard's HParams plugin keeps, for each run, the *first* experiment summary it reads (a later
one in the same run is ignored), and lists exactly that summary's metrics. Lightning's
``TensorBoardLogger`` writes its own, with the placeholder ``hp_metric = -1`` as the only metric,
right after the callbacks' ``on_fit_start``. So that the experiment can list every scalar the fit
logged, netprobe holds that placeholder back for the fit (the logger's ``default_hp_metric``,
restored at ``on_train_start``), writes the session's hyperparameters at ``on_fit_start`` and the
experiment at ``on_train_end``. Until then the plugin lists the run's scalar tags by itself (in
alphabetical order). A logger whose placeholder cannot be held back gets the experiment at
``on_fit_start``, with netprobe's keys and ``hp_metric`` only.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe._keys import BEST_TRACKED as _BEST
from netprobe._keys import FACTS
from netprobe._keys import MODEL_LEVEL as _MODEL_LEVEL
from netprobe.lightning._shared_pass import _shared_pass

if TYPE_CHECKING:  # pragma: no cover
    from netprobe.lightning._shared_pass import Trainer

#: netprobe keys that are facts about a measurement, not results: no HParams metric
_FACTS = tuple(f"netprobe/{fact}/" for fact in FACTS)

#: the private attribute of Lightning's ``TensorBoardLogger`` (both packages) that holds its
#: ``default_hp_metric`` argument; tests/lightning/test_hparams_metrics.py fails by name if it goes
_DEFAULT_HP_METRIC = "_default_hp_metric"


@dataclasses.dataclass
class _RunRecord:
    """What netprobe wrote, and has yet to write, for the run of one TensorBoard writer.

    Attributes:
        keys: netprobe's HParams metrics, in the experiment's order.
        hp_key: the netprobe key logged as ``hp_metric`` at each measurement (None: none).
        logger: the ``TensorBoardLogger`` that owns the writer (weakly held).
        experiment_due: the experiment is still to be written (at ``on_train_end``).
        restore_default: the logger's ``default_hp_metric`` was turned off for this fit.
    """

    keys: List[str]
    hp_key: Optional[str]
    logger: Any
    experiment_due: bool = False
    restore_default: bool = False


_RUNS: "weakref.WeakKeyDictionary[Any, _RunRecord]" = weakref.WeakKeyDictionary()


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
    """TensorBoard custom-scalars layout for the netprobe metrics ``metrics``.

    Each chart's regular expression matches one key per run, so a sweep's chart has one line per
    run: category ``netprobe``, one chart per metric of its mean ``netprobe/<metric>``; category
    ``netprobe best so far``, one chart per ``netprobe/best/<metric>`` (the metrics in
    ``BEST_TRACKED``); category ``netprobe per layer``, one chart per metric with a line per layer
    and run (``netprobe/<metric>/<layer>``; none for model-level metrics); category
    ``netprobe time``, the monitors' seconds per measurement. A layout names tags only: the x axis
    is the dashboard's choice (step, relative or wall time), and netprobe logs at the step of
    Lightning's epoch-level scalars, beside an ``epoch`` scalar.

    Args:
        metrics: metric names (``"reliance_auc"``, ``"cka_prev"``, ...); duplicates are dropped.

    Returns:
        ``{category title: {chart title: ["Multiline", [regex]]}}``, what
        ``SummaryWriter.add_custom_scalars`` takes.
    """
    names = list(dict.fromkeys(metrics))
    return {
        "netprobe": {m: ["Multiline", [rf"^netprobe/{re.escape(m)}$"]] for m in names},
        "netprobe best so far": {f"best/{m}": ["Multiline", [rf"^netprobe/best/{re.escape(m)}$"]] for m in names if m in _BEST},
        "netprobe per layer": {f"{m} per layer": ["Multiline", [rf"^netprobe/{re.escape(m)}/"]]
                               for m in names if m not in _MODEL_LEVEL},
        "netprobe time": {"seconds per measurement": ["Multiline", [r"^netprobe/time/"]]},
    }


def hparams_metric_order(netprobe_keys: Sequence[str], own_keys: Sequence[str] = ()) -> List[str]:
    """The HParams experiment's metrics: netprobe's means and bests first (reliance leading, in
    ``BEST_TRACKED``'s order, then the other metrics by name), then the per-layer keys, then
    ``own_keys`` (the run's other scalars) in their given order; facts about a measurement
    (``netprobe/time/``, ``layer_index/``, ``layer_units/``, ``layer_type/``) are left out, and
    each key comes once.

    Example:
        >>> hparams_metric_order(["netprobe/cka_prev/relu1", "netprobe/cka_prev", "netprobe/reliance_auc"], ["train/loss"])
        ['netprobe/reliance_auc', 'netprobe/cka_prev', 'netprobe/cka_prev/relu1', 'train/loss']
    """
    family = {m: i for i, m in enumerate(_BEST)}

    def order(key: str) -> Tuple[int, int, str]:
        parts = key.split("/")
        metric = parts[2] if parts[1] == "best" else parts[1]
        per_layer = int(parts[1] != "best" and len(parts) > 2)
        return per_layer, family.get(metric, len(family)), key

    ours = sorted(dict.fromkeys(k for k in netprobe_keys if not k.startswith(_FACTS)), key=order)
    rest = [k for k in dict.fromkeys(own_keys) if k not in ours and not k.startswith(_FACTS)]
    return ours + rest


def _lead_key(trainer: Trainer, keys: Sequence[str]) -> Optional[str]:
    """The key ``hp_metric`` copies: the netprobe mean an early-stopping callback of the Trainer
    monitors, else the first mean of ``keys`` (in the HParams order: ``netprobe/reliance_auc`` when
    a ``RelianceMonitor`` is attached)."""
    means = [k for k in keys if k.count("/") == 1]
    for cb in getattr(trainer, "callbacks", []) or []:
        monitor = getattr(cb, "monitor", None)
        if type(cb).__name__.endswith("EarlyStopping") and monitor in means:
            return monitor
    return means[0] if means else None


def _register_tensorboard(trainer: Trainer, pl_module: nn.Module, mons: Sequence[Any]) -> None:
    """At ``on_fit_start``, once per run and writer (rank zero, TensorBoardLogger): write the
    custom-scalars layout of every netprobe monitor of the Trainer (``mons``, in the Trainer's
    order) and the HParams session, and hold Lightning's ``hp_metric`` placeholder back so that
    :func:`_write_experiment` writes the experiment at ``on_train_end`` (see the module docstring)."""
    if _dist.rank() != 0:
        return
    logger, writer = _tensorboard_logger(list(getattr(trainer, "loggers", []) or []))
    if writer is None or not hasattr(writer, "_get_file_writer"):
        return
    keys = hparams_metric_order([k for m in mons for k in m.logged_keys(pl_module)])
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
    record = _RunRecord(keys=keys, hp_key=_lead_key(trainer, keys), logger=weakref.proxy(logger))
    _RUNS[writer] = record
    metrics = keys + (["hp_metric"] if record.hp_key else [])
    exp, ssi, sei = hparams(_hparams_of(trainer, pl_module), {k: 0.0 for k in metrics})
    fw = writer._get_file_writer()
    if isinstance(getattr(logger, _DEFAULT_HP_METRIC, None), bool):
        record.restore_default = getattr(logger, _DEFAULT_HP_METRIC)
        setattr(logger, _DEFAULT_HP_METRIC, False)
        record.experiment_due = True
        fw.add_summary(ssi)
    else:
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)


def _restore_hp_metric_default(trainer: Trainer) -> None:
    """At ``on_train_start`` (Lightning has logged the hyperparameters): give the TensorBoardLogger
    its ``default_hp_metric`` back."""
    _, writer = _tensorboard_logger(list(getattr(trainer, "loggers", []) or []))
    record = _RUNS.get(writer) if writer is not None else None
    if record is not None and record.restore_default:
        record.restore_default = False
        try:
            setattr(record.logger, _DEFAULT_HP_METRIC, True)
        except ReferenceError:  # pragma: no cover - the logger is gone
            pass


def _log_hp_metric(trainer: Trainer, scalars: Mapping[str, float], step: int) -> None:
    """Log ``hp_metric`` (the value of the run's lead key, when ``scalars`` has it) to the
    TensorBoardLogger at ``step``, so that the HParams tab's ``hp_metric`` is netprobe's signal."""
    _, writer = _tensorboard_logger(list(getattr(trainer, "loggers", []) or []))
    record = _RUNS.get(writer) if writer is not None else None
    if record is None or record.hp_key not in scalars:
        return
    try:
        record.logger.log_metrics({"hp_metric": float(scalars[record.hp_key])}, step=step)
    except ReferenceError:  # pragma: no cover - the logger is gone
        pass


def _write_experiment(trainer: Trainer, pl_module: nn.Module) -> None:
    """At ``on_train_end`` (rank zero): write the HParams experiment held back at ``on_fit_start``,
    its metrics every scalar the fit logged: netprobe's keys (:func:`hparams_metric_order`), then
    ``hp_metric``, then the keys Lightning logged for the fit (``trainer.logged_metrics``, in the
    order they came)."""
    if _dist.rank() != 0:
        return
    _, writer = _tensorboard_logger(list(getattr(trainer, "loggers", []) or []))
    record = _RUNS.get(writer) if writer is not None else None
    if record is None or not record.experiment_due:
        return
    record.experiment_due = False
    from torch.utils.tensorboard.summary import hparams

    own = (["hp_metric"] if record.hp_key else []) + [
        k for k in (getattr(trainer, "logged_metrics", None) or {}) if not k.startswith("netprobe/") and k != "epoch"]
    metrics = hparams_metric_order(record.keys, own)
    exp, _, sei = hparams(_hparams_of(trainer, pl_module), {k: 0.0 for k in metrics})
    fw = writer._get_file_writer()
    fw.add_summary(exp)
    fw.add_summary(sei)
    writer.flush()


def _tensorboard_logger(loggers: Sequence[Any]) -> Tuple[Optional[Any], Optional[Any]]:
    """The first ``TensorBoardLogger`` of ``loggers`` and its writer, or ``(None, None)``."""
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            exp = logger.experiment
            if hasattr(exp, "add_histogram") and hasattr(exp, "add_figure"):
                return logger, exp
    return None, None


def _tensorboard_writer(loggers: Sequence[Any]) -> Optional[Any]:
    """The ``SummaryWriter`` of the first ``TensorBoardLogger`` of ``loggers``, or None."""
    return _tensorboard_logger(loggers)[1]


def _has_tensorboard(trainer: Trainer) -> bool:
    return any(type(lg).__name__ == "TensorBoardLogger" for lg in (getattr(trainer, "loggers", None) or []))
