"""Early stopping on a netprobe signal, without a validation set.

Morcos et al. (2018) found that a network's reliance on single directions, measured on the
*training* data, tracks generalization: as a network starts to memorize, ablating a few units
hurts it more, and the normalized ablation AUC falls. So one can stop when
``netprobe/reliance_auc`` (logged by :class:`~netprobe.lightning.RelianceMonitor`) stops
improving, and keep no data aside for validation.

:class:`RelianceEarlyStopping` is Lightning's own ``EarlyStopping`` with:

* netprobe defaults: ``monitor="netprobe/reliance_auc"``, ``mode="max"``, ``patience=3``;
* ``smoothing``: an exponential moving average of the signal (default 0.5; ``0`` = off): a
  training network's reliance moves from epoch to epoch by more than the measurement noise of
  ``RelianceMonitor`` with its fixed orders, and single-epoch dips should not stop training;
* ``warmup_epochs``: records of the first epochs (default 5) are ignored. Early in training the
  normalized AUC reflects how little the network has fit (an underfit network has little to lose,
  so it scores high), not memorization: it can rise or fall steeply there;
* ``min_probe_accuracy``: records taken while the network's own accuracy on the probe set
  (``netprobe/probe_accuracy``, logged by ``RelianceMonitor``) is below this are ignored the
  same way, a warm-up measured in fit rather than epochs;
* only *fresh* records count: a monitor that runs every ``n`` epochs leaves its last value in
  ``trainer.callback_metrics`` in between, and plain ``EarlyStopping`` would count each stale
  repetition as "no improvement". Here patience is counted in measurements, not epochs.

It is built on the ``EarlyStopping`` of ``pytorch_lightning`` when that package is installed (the
netprobe dependency), else of ``lightning.pytorch``; either ``Trainer`` accepts it. Pass
``strict=False`` (the default here) so that epochs before the first measurement do not raise.

When it stops the run it prints one line (rank zero, through Lightning's ``rank_zero_info``, shown
by a default ``Trainer``): the epoch, the best (smoothed) value and its epoch, and why: patience
exhausted after ``N`` fresh measurements without improvement, the ``stopping_threshold`` or
``divergence_threshold`` reached, or a value that is not finite. ``verbose=True`` adds Lightning's
own message at every check.

Example:
    >>> from netprobe.lightning.early_stopping import RelianceEarlyStopping
    >>> stop = RelianceEarlyStopping(patience=4, smoothing=0.5, warmup_epochs=2)
    >>> stop.monitor, stop.mode
    ('netprobe/reliance_auc', 'max')
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

try:  # the netprobe dependency
    from pytorch_lightning.callbacks import EarlyStopping as _EarlyStopping
    from pytorch_lightning.utilities import rank_zero_info
except ImportError:  # pragma: no cover - only the unified package installed
    from lightning.pytorch.callbacks import EarlyStopping as _EarlyStopping
    from lightning.pytorch.utilities import rank_zero_info

from netprobe.lightning._shared_pass import _RunIdentity  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from netprobe.lightning._shared_pass import Trainer

__all__ = ["RelianceEarlyStopping"]

_PROBE_ACC = "netprobe/probe_accuracy"

#: the private members of Lightning's ``EarlyStopping`` this class relies on, for want of public
#: ones, with the parameters they are called with: ``_run_early_stopping_check`` is overridden
#: (Lightning's ``on_train_epoch_end`` / ``on_validation_end`` call it), the others are called.
#: tests/lightning/test_early_stopping_lightning_contract.py checks them on both installed
#: ``EarlyStopping`` classes, so a Lightning release that changes one fails that test by name.
_LIGHTNING_PRIVATE = {
    "_run_early_stopping_check": ("self", "trainer"),
    "_validate_condition_metric": ("self", "logs"),
    "_evaluate_stopping_criteria": ("self", "current"),
    "_log_info": ("trainer", "message", "log_rank_zero_only"),  # a staticmethod
}


class RelianceEarlyStopping(_EarlyStopping):
    """``EarlyStopping`` preset for netprobe signals (see the module docstring).

    Args:
        monitor: the logged key; default ``"netprobe/reliance_auc"`` (mean over monitored layers).
        mode: ``"max"`` (every ``*_auc`` is higher-is-better) or ``"min"``.
        patience: number of *fresh* measurements without improvement before stopping.
        min_delta: minimum change that counts as an improvement.
        smoothing: EMA factor ``beta`` in ``[0, 1)``: the signal compared is
            ``s_t = beta * s_{t-1} + (1 - beta) * x_t`` (``0`` = raw values). Default 0.5, so that
            a single-epoch dip does not stop the run (docs/early-stopping.md has the measurements).
        warmup_epochs: measurements made before this epoch (0-based ``trainer.current_epoch``)
            update the EMA but never count towards patience or the best score. Default 5: an
            underfit network scores high on the normalized AUC (it has little to lose), so a rule
            without a warm-up stops at the first epochs (docs/early-stopping.md). ``0`` = none.
        min_probe_accuracy: measurements made while ``netprobe/probe_accuracy`` is below this
            are treated like warm-up ones (needs a ``RelianceMonitor`` in the same ``Trainer``).
        **kwargs: any other ``EarlyStopping`` argument (``strict`` defaults to ``False``,
            ``verbose``, ``stopping_threshold``, ``check_on_train_epoch_end``...).

    Checked at ``setup``, before the first step: when netprobe monitors are attached to the
    ``Trainer``, a ``monitor`` key starting with ``netprobe/`` that none of them logs (a misspelled
    key, or a metric of a monitor that is not attached) raises ``ValueError`` listing the keys they
    log and the closest one; so does ``min_probe_accuracy`` when none of them is a
    ``RelianceMonitor``. With no netprobe monitor attached at all, a ``UserWarning`` says so (the key
    may still come from other code that logs it). Keys outside ``netprobe/`` are not checked.
    """

    def __init__(
        self,
        monitor: str = "netprobe/reliance_auc",
        *,
        mode: str = "max",
        patience: int = 3,
        min_delta: float = 0.0,
        smoothing: float = 0.5,
        warmup_epochs: int = 5,
        min_probe_accuracy: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"Expected `monitor` to be a logged key such as 'netprobe/reliance_auc', but got {monitor!r}.")
        if not (isinstance(smoothing, (int, float)) and 0.0 <= float(smoothing) < 1.0):
            raise ValueError(f"Expected `smoothing` in [0, 1) (0 = off), but got {smoothing!r}.")
        if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"Expected `warmup_epochs` to be an int >= 0, but got {warmup_epochs!r}.")
        if min_probe_accuracy is not None and not (
            isinstance(min_probe_accuracy, (int, float)) and 0.0 <= float(min_probe_accuracy) <= 1.0
        ):
            raise ValueError(f"Expected `min_probe_accuracy` in [0, 1] or None, but got {min_probe_accuracy!r}.")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"Expected `patience` to be an int >= 1, but got {patience!r}.")
        kwargs.setdefault("strict", False)
        super().__init__(monitor=monitor, mode=mode, patience=patience, min_delta=min_delta, **kwargs)
        self.smoothing = float(smoothing)
        self.warmup_epochs = warmup_epochs
        self.min_probe_accuracy = None if min_probe_accuracy is None else float(min_probe_accuracy)
        self._ema: Optional[torch.Tensor] = None
        self._last_seen: Any = None  # the tensor object last read from callback_metrics
        self._last_value: Optional[float] = None
        self.history: list[tuple[int, float, float]] = []  # (epoch, raw, smoothed) of fresh records
        self.best_epoch: Optional[int] = None  # the epoch of the record that set ``best_score``
        self._run = _RunIdentity()

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """Check, before the first step, that the monitored netprobe key is logged by an attached monitor (and that ``min_probe_accuracy`` has a ``RelianceMonitor`` to read)."""
        super().setup(trainer, pl_module, stage)
        if str(getattr(stage, "value", stage)) == "fit":  # stopping acts in fit only
            self._check_keys(trainer, pl_module)
        # reused for another Trainer or model, it starts afresh, like the monitors (its EMA, best
        # score and patience belong to the old run); a resumed checkpoint's state is loaded after this
        if self._run.begins(trainer, pl_module, stage) == "other":
            self._ema, self._last_seen, self._last_value, self.history, self.best_epoch = None, None, None, [], None
            self.wait_count, self.stopped_epoch, self.stopping_reason_message = 0, 0, None
            self.best_score = torch.tensor(torch.inf if self.monitor_op == torch.lt else -torch.inf)
            if hasattr(self, "stopping_reason"):  # Lightning >= 2.5
                self.stopping_reason = getattr(type(self.stopping_reason), "NOT_STOPPED", self.stopping_reason)

    def _check_keys(self, trainer: Trainer, pl_module: Any) -> None:
        """Refuse, before the first step, a ``netprobe/`` key that no attached monitor logs."""
        from netprobe._validation import close_names
        from netprobe.lightning.base import NetprobeMonitor

        needed = [self.monitor] + ([_PROBE_ACC] if self.min_probe_accuracy is not None else [])
        needed = [k for k in needed if k.startswith("netprobe/")]
        if not needed:
            return
        monitors = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, NetprobeMonitor)]
        if not monitors:
            if getattr(trainer, "is_global_zero", True):  # once, not once per rank
                warnings.warn(
                    f"RelianceEarlyStopping monitors {', '.join(map(repr, needed))}, but no netprobe monitor is attached to "
                    "the Trainer: unless other code logs it, training will never stop on it. Add "
                    "`RelianceMonitor(layers=...)` to the Trainer's callbacks.",
                    UserWarning, stacklevel=2,
                )
            return
        keys = {k for mon in monitors for k in mon.logged_keys(pl_module)}
        for key in needed:
            if key in keys:
                continue
            what = "`min_probe_accuracy` reads" if key == _PROBE_ACC and key != self.monitor else "`monitor` is"
            fix = ("add a RelianceMonitor to the Trainer's callbacks, or drop min_probe_accuracy" if key == _PROBE_ACC
                   else "pass one of them as `monitor=`, or attach the monitor that logs it")
            names = ", ".join(type(m).__name__ for m in monitors)
            raise ValueError(
                f"RelianceEarlyStopping: {what} {key!r}, but no attached netprobe monitor ({names}) logs it. "
                f"Closest: {close_names(key, sorted(keys), n=3)}. The attached monitors log: {sorted(keys)}. "
                f"To fix it, {fix}."
            )

    def _run_early_stopping_check(self, trainer: Trainer) -> None:
        """Lightning's check (called by its ``on_train_epoch_end`` / ``on_validation_end``), on
        fresh records only, smoothed, after the warm-up (see the module docstring)."""
        logs = trainer.callback_metrics
        if trainer.fast_dev_run or not self._validate_condition_metric(logs):
            return
        raw = logs[self.monitor]
        value = float(raw.detach().float().mean()) if isinstance(raw, torch.Tensor) else float(raw)
        if raw is self._last_seen and value == self._last_value:
            return  # a stale repetition: the monitor did not measure this epoch
        self._last_seen, self._last_value = raw, value
        if self.check_finite and not math.isfinite(value):
            # the monitors log NaN for a diverged network: stop at once, warm-up or not
            self.history.append((int(trainer.current_epoch), value, value))
            self._decide(trainer, True, f"Monitored metric {self.monitor} = {value} is not finite (the network's "
                                        "outputs are NaN/Inf: diverged training?). Signaling Trainer to stop.",
                         why=f"{self.monitor} = {value} is not finite (diverged training?)")
            return
        current = torch.tensor(value, dtype=torch.float64)
        self._ema = current if self._ema is None or self.smoothing == 0.0 else (
            self.smoothing * self._ema + (1.0 - self.smoothing) * current
        )
        self.history.append((int(trainer.current_epoch), value, float(self._ema)))
        if trainer.current_epoch < self.warmup_epochs:
            return
        if self.min_probe_accuracy is not None:
            fit = logs.get(_PROBE_ACC)
            if fit is None:
                raise RuntimeError(
                    f"RelianceEarlyStopping(min_probe_accuracy={self.min_probe_accuracy}) reads {_PROBE_ACC!r}, which "
                    "no callback logged; add a RelianceMonitor to the Trainer's callbacks, or drop min_probe_accuracy."
                )
            if float(fit) < self.min_probe_accuracy:
                return
        current = self._ema.to(torch.float32)
        best_before = self.best_score.clone()
        should_stop, reason = self._evaluate_stopping_criteria(current)
        if not torch.equal(self.best_score.cpu(), best_before.cpu()):
            self.best_epoch = int(trainer.current_epoch)
        self._decide(trainer, should_stop, reason, why=self._why(current) if should_stop else None)

    def _why(self, current: torch.Tensor) -> str:
        """Why Lightning's criteria stopped on the smoothed ``current`` (checked in its order)."""
        value = float(current)
        if self.stopping_threshold is not None and self.monitor_op(current, self.stopping_threshold):
            return f"{self.monitor} {self._smoothed}{value:.4f} reached stopping_threshold={self.stopping_threshold}"
        if self.divergence_threshold is not None and self.monitor_op(-current, -self.divergence_threshold):
            return f"{self.monitor} {self._smoothed}{value:.4f} passed divergence_threshold={self.divergence_threshold}"
        n = self.wait_count
        return (f"patience exhausted after {n} fresh measurement{'s' if n != 1 else ''} without improvement "
                f"(patience={self.patience}, min_delta={abs(self.min_delta)})")

    @property
    def _smoothed(self) -> str:
        return f"(EMA {self.smoothing}) " if self.smoothing else ""

    def _decide(self, trainer: Trainer, should_stop: bool, reason: Optional[str], why: Optional[str] = None) -> None:
        """Stop when any rank says so, as Lightning's EarlyStopping does, and say so in one line."""
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)
        if should_stop:
            best = float(self.best_score)
            told = (f"best {self.monitor} {self._smoothed}{best:.4f} at epoch {self.best_epoch}" if math.isfinite(best)
                    else f"no best {self.monitor} recorded after the warm-up")
            rank_zero_info(f"RelianceEarlyStopping: stopped at epoch {self.stopped_epoch}: "
                           f"{why or 'another rank decided to stop'}; {told}.")

    def state_dict(self) -> Dict[str, Any]:
        """Lightning's ``EarlyStopping`` state plus the smoothed value, the history of values, the best epoch and the settings."""
        state = super().state_dict()
        state.update(
            ema=None if self._ema is None else float(self._ema),
            last_value=self._last_value,
            history=list(self.history),
            best_epoch=self.best_epoch,
            smoothing=self.smoothing,
            warmup_epochs=self.warmup_epochs,
            min_probe_accuracy=self.min_probe_accuracy,
        )
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state."""
        super().load_state_dict(state_dict)
        ema = state_dict.get("ema")
        self._ema = None if ema is None else torch.tensor(ema, dtype=torch.float64)
        self._last_value = state_dict.get("last_value")
        self.history = [tuple(h) for h in state_dict.get("history", [])]
        self.best_epoch = state_dict.get("best_epoch")

