"""Which runs belong together, and which fit badly: :func:`group_labels` (a regex on the run names
and/or hyperparameters) for the grouped bootstrap and cross-validation, and the underfit flags on
``netprobe/probe_accuracy`` (flagged, never dropped).
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from netprobe._validation import close_names
from netprobe.select.errors import SelectionError, _plural
from netprobe.select.events import Run
from netprobe.select.values import _value_at


UNDERFIT_KEY = "netprobe/probe_accuracy"
#: the robust rule's smallest gap below the median (accuracy units), so that a sweep where most runs
#: reach 1.0 (MAD 0) does not flag a run at 0.99
UNDERFIT_MIN_GAP = 0.05
#: the bimodal rule: a run below this fraction of the upper half's median probe accuracy is flagged
UNDERFIT_FRACTION = 0.5


def _underfit(pool: Sequence[Run], at: Union[str, int], underfit_below: Optional[float]) -> Dict[str, Any]:
    """Flag runs whose probe accuracy (at the signal's epoch, else its last value) is far below the
    others': below ``underfit_below`` when given, else below the larger of two thresholds (needs 3
    runs with a value):

    * the outlier rule ``median - max(3 x 1.4826 x MAD, UNDERFIT_MIN_GAP)`` (1.4826 x MAD estimates
      the sd of normal data): one run, or a few, far below a sweep whose runs mostly agree;
    * the bimodal rule ``UNDERFIT_FRACTION x`` the median of the upper half (the runs at or above
      the median): less than half the accuracy of a typical well-fitting run. When many runs stay
      near chance the MAD is so large that the outlier rule's threshold falls below every run (on a
      sweep with a third of its runs near chance it was negative); this one still flags them.

    Half of the way from 0 (the least possible accuracy) to the well-fitting runs' level: the
    number of classes is not in the logs, so chance is not used; with 10 classes a run at chance
    (0.1) is flagged whenever the upper half's median is above 0.2."""
    vals: Dict[str, Optional[float]] = {}
    for r in pool:
        v, _ = _value_at(r, UNDERFIT_KEY, at if isinstance(at, int) else "last", "max")
        vals[r.name] = float(v) if v is not None and math.isfinite(v) else None
    fin = np.array([v for v in vals.values() if v is not None], dtype=np.float64)
    thr: Optional[float] = None
    if underfit_below is not None:
        thr, rule = float(underfit_below), f"{UNDERFIT_KEY} < {float(underfit_below):g} (underfit_below)"
    elif len(fin) >= 3:
        med = float(np.median(fin))
        mad = float(np.median(np.abs(fin - med)))
        outlier = med - max(3 * 1.4826 * mad, UNDERFIT_MIN_GAP)
        upper = float(np.median(fin[fin >= med]))
        bimodal = UNDERFIT_FRACTION * upper
        thr = max(outlier, bimodal)
        rule = (f"{UNDERFIT_KEY} < {thr:.4g}, the larger of median {med:.4g} - max(3 x 1.4826 x MAD {mad:.3g}, "
                f"{UNDERFIT_MIN_GAP:g}) = {outlier:.4g} and {UNDERFIT_FRACTION:g} x the upper half's median {upper:.4g} "
                f"= {bimodal:.4g}")
    elif len(fin):
        rule = f"not checked: {_plural(len(fin), 'run')} logged {UNDERFIT_KEY} (the robust rule needs 3; pass a threshold: underfit_below=, or --underfit-below on the command line)"
    else:
        rule = f"not checked: no run logged {UNDERFIT_KEY}"
    flagged = [n for n, v in vals.items() if thr is not None and v is not None and v < thr]
    return {"key": UNDERFIT_KEY, "threshold": thr, "rule": rule, "runs": flagged, "values": vals}


def group_labels(runs: Sequence[Run], *, group: Optional[str] = None, group_by: Union[str, Sequence[str]] = ()) -> Dict[str, str]:
    """Each run's group (run name -> label) for a grouped bootstrap and cross-validation.

    ``group``: a regular expression searched (``re.search``) in each run's name; its first capture
    group names the run's group, or the whole match when it has none (``r"^(c\\d+)_"`` puts
    ``c03_lr0.01_s0`` and ``c03_lr0.01_s1`` in group ``c03``). ``group_by``: hyperparameter names
    (from the runs' ``hparams``); runs with equal values of all of them form a group. Both together:
    runs sharing both. A run the regex does not match, or without one of the hyperparameters, is
    refused (``SelectionError``, naming it): a run left out of the grouping would be counted as a
    group of its own, which is the mistake grouping is there to avoid.

    Example:
        >>> runs = [Run(n, "", hparams={"lr": lr}) for n, lr in [("c0_s0", 0.1), ("c0_s1", 0.1), ("c1_s0", 0.2)]]
        >>> group_labels(runs, group=r"^(c\\d+)_")
        {'c0_s0': 'c0', 'c0_s1': 'c0', 'c1_s0': 'c1'}
        >>> group_labels(runs, group_by="lr")
        {'c0_s0': 'lr=0.1', 'c0_s1': 'lr=0.1', 'c1_s0': 'lr=0.2'}
    """
    by = [b for part in ([group_by] if isinstance(group_by, str) else list(group_by)) for b in str(part).split(",") if b.strip()]
    by = [b.strip() for b in by]
    if group is None and not by:
        raise SelectionError("Expected `group` (a regex on the run names) or `group_by` (hyperparameter names), but got neither.")
    labels: Dict[str, List[str]] = {r.name: [] for r in runs}
    if group is not None:
        if not isinstance(group, str) or not group:
            raise SelectionError(f"Expected `group` to be a regular expression (a non-empty str such as '^(c\\d+)_'), but got {group!r}.")
        try:
            pattern = re.compile(group)
        except re.error as err:
            raise SelectionError(f"Expected `group` to be a regular expression, but got {group!r}: {err}. "
                                 "Quote it in the shell, e.g. --group '^(c\\d+)_'.") from None
        missed = []
        for r in runs:
            m = pattern.search(r.name)
            label = None if m is None else (m.group(1) if pattern.groups else m.group(0))
            if not label:
                missed.append(r.name)
            else:
                labels[r.name].append(label)
        examples = ", ".join(repr(r.name) for r in runs[:3])
        if missed and len(missed) == len(runs):
            raise SelectionError(
                f"The group regex {group!r} matches no run name (runs are named like {examples}). Write a pattern "
                "that re.search finds in every run's name, whose first capture group names its configuration "
                "(e.g. '^(c\\d+)_' or '(.*)_s\\d+$'), or group by hyperparameters with --group-by / group_by."
            )
        if missed:
            raise SelectionError(
                f"The group regex {group!r} matches {len(runs) - len(missed)} of {_plural(len(runs), 'run')} but not "
                f"{', '.join(repr(n) for n in missed[:5])}{' ...' if len(missed) > 5 else ''} ({len(missed)} in all). Every run "
                "needs a group (a run left out would count as a group of its own): widen the pattern, or drop those runs with --where."
            )
    for key in by:
        missing = [r.name for r in runs if key not in r.hparams]
        if len(missing) == len(runs):
            known = sorted({k for r in runs for k in r.hparams})
            raise SelectionError(
                f"No run has the hyperparameter {key!r} to group by. Closest: {close_names(key, known)} "
                f"({len(known)} hyperparameters logged; they come from the HParams plugin and hparams.yaml)."
            )
        if missing:
            raise SelectionError(
                f"Expected every run to have the hyperparameter {key!r} to group by, but "
                f"{', '.join(repr(n) for n in missing[:5])}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all) "
                "lack it. Group by a regex on the run names (--group / group) instead, or drop those runs."
            )
        for r in runs:
            labels[r.name].append(f"{key}={r.hparams[key]}")
    return {name: ",".join(parts) for name, parts in labels.items()}


def _grouping(runs: Sequence[Run], group: Optional[str], group_by: Union[str, Sequence[str]]) -> Tuple[Optional[Dict[str, str]], Optional[Dict[str, Any]]]:
    """``(run name -> label, a description)`` or ``(None, None)`` when no grouping was asked for."""
    by = [group_by] if isinstance(group_by, str) else list(group_by or ())
    if group is None and not by:
        return None, None
    labels = group_labels(runs, group=group, group_by=by)
    sizes: Dict[str, int] = {}
    for g in labels.values():
        sizes[g] = sizes.get(g, 0) + 1
    if len(sizes) < 2 and len(runs) >= 2:
        raise SelectionError(
            f"Expected the grouping to form at least 2 groups, but all {_plural(len(runs), 'run')} fall in one "
            f"({next(iter(sizes))!r}): there is nothing to resample. Check the regex's capture group or the hyperparameters."
        )
    counts = sorted(sizes.values())
    return labels, {"regex": group, "by": [b.strip() for part in by for b in str(part).split(",") if b.strip()],
                    "n_groups": len(sizes), "sizes": sizes, "runs_per_group": [counts[0], counts[-1]] if counts else None}
