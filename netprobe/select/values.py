"""Reading one value of a loaded run: a series at ``at`` (``"last"``, ``"best"``, an epoch) and the
``where`` conditions (read at the signal's epoch, per measurement with ``"best"``, else last).

NaN measurements (a diverged network) never count as best, and a non-finite signal is no signal.
"""

from __future__ import annotations

import bisect
import math
from typing import Optional, Sequence, Tuple, Union

from netprobe.select.events import Run
from netprobe.select.keys import _OPS


def _value_at(run: Run, tag: str, at: Union[str, int], mode: str) -> Tuple[Optional[float], Optional[str]]:
    s = run.scalars.get(tag)
    if not s:
        return None, f"no {tag!r}"
    if at == "last":
        return s[-1][1], None
    if at == "best":
        vals = [v for _, v in s if math.isfinite(v)]  # NaN = a measurement of a diverged network
        if not vals:
            return None, f"no finite {tag!r}"
        return (max(vals) if mode == "max" else min(vals)), None
    epoch = int(at)
    ep = run.scalars.get("epoch")
    if ep:
        steps = {st for st, v in ep if int(round(v)) == epoch}
        hits = [v for st, v in s if st in steps]
        if hits:
            return hits[-1], None
        last_epoch = int(round(max(v for _, v in ep)))
        if last_epoch < epoch:
            return None, f"stopped before epoch {epoch} (last epoch {last_epoch})"
        return None, f"no {tag!r} at epoch {epoch}"
    if epoch < len(s):
        return s[epoch][1], None
    return None, f"stopped before epoch {epoch} ({len(s)} values of {tag!r})"


def _last(run: Run, tag: str) -> Optional[float]:
    s = run.scalars.get(tag)
    return s[-1][1] if s else None


def _epoch_of_step(run: Run, step: int) -> Optional[int]:
    """The epoch a step belongs to, from the ``epoch`` scalar (its value at or before ``step``)."""
    ep = run.scalars.get("epoch", [])  # sorted by step, one value per step
    i = bisect.bisect_right(ep, (step, math.inf))
    return int(round(ep[i - 1][1])) if i else None


def _condition_value(run: Run, tag: str, epoch: Optional[int]) -> Optional[float]:
    """A condition's value at ``epoch`` (its last value when ``epoch`` is None). A key first
    logged after that epoch (e.g. a test accuracy logged once at the end) is read at its last value."""
    if epoch is None or not run.scalars.get("epoch"):
        return _last(run, tag)
    v, _ = _value_at(run, tag, epoch, "max")
    if v is not None:
        return v
    epochs = [_epoch_of_step(run, st) for st, _ in run.scalars.get(tag, [])]
    if epochs and all(e is not None and e > epoch for e in epochs):
        return _last(run, tag)
    return None


def _holds(c: Optional[float], op: str, val: float) -> bool:
    return c is not None and math.isfinite(c) and _OPS[op](c, val)


def _best_where(run: Run, tag: str, mode: str, conds: Sequence[Tuple[str, str, float]]) -> Tuple[Optional[float], Optional[str]]:
    """The best finite value of ``tag`` among its measurements at which every condition holds (each
    condition read at the measurement's epoch, or at the same step when no ``epoch`` is logged), so
    that ``--at best --where probe_accuracy>=x`` never picks a value from before the network fit."""
    s = run.scalars.get(tag)
    if not s:
        return None, f"no {tag!r}"
    by_epoch = bool(run.scalars.get("epoch"))
    ok = []
    for step, v in s:
        if not math.isfinite(v):
            continue
        if by_epoch:
            e = _epoch_of_step(run, step)
            vals = [(_condition_value(run, key, e), op, val) for key, op, val in conds]
        else:
            vals = [(next((c for st, c in reversed(run.scalars.get(key, [])) if st <= step), _last(run, key)), op, val)
                    for key, op, val in conds]
        if all(_holds(c, op, val) for c, op, val in vals):
            ok.append(v)
    if not ok:
        cond = " and ".join(f"{k}{op}{v:g}" for k, op, v in conds)
        return None, f"no measurement of {tag!r} with {cond}"
    return (max(ok) if mode == "max" else min(ok)), None


def _fails_conditions(r: Run, conds: Sequence[Tuple[str, str, float]], at: Union[str, int]) -> Optional[str]:
    """Why ``r`` fails a condition (read at ``at``'s epoch, else at its last value), or None. With
    ``at="best"`` conditions are checked per measurement instead (:func:`_best_where`)."""
    for key, op, val in ([] if at == "best" else conds):
        v = _condition_value(r, key, at if isinstance(at, int) else None)
        if not _holds(v, op, val):
            why_c = _value_at(r, key, at if isinstance(at, int) else "last", "max")[1] if v is None else None
            return why_c or (f"no {key!r}" if v is None else f"{key}={v:.4g} fails {op} {val:g}")
    return None


def _signal_value(r: Run, key: str, mode: str, at: Union[str, int], conds: Sequence[Tuple[str, str, float]]) -> Tuple[Optional[float], Optional[str]]:
    v, why = _best_where(r, key, mode, conds) if at == "best" and conds else _value_at(r, key, at, mode)
    if v is None or not math.isfinite(v):
        return None, why or "non-finite signal"
    return float(v), None
