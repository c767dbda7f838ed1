"""Strata: which runs of a sweep are comparable. A signal compared across networks of other widths
or other monitored layers mixes the network's quality with what the signal does with width
(single-direction reliance rises with width), so runs are ranked within strata of runs whose
monitored layers are the same, of the same module types with the same widths, as the monitors
log them once per fit (``netprobe/layer_units/<layer>``, ``netprobe/layer_type/<layer>/<Type>``),
refined by hyperparameters the caller names (``within``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from netprobe.select.errors import SelectionError
from netprobe.select.events import Run
from netprobe.select.keys import LAYER_INDEX_PREFIX
from netprobe.select.stats import kendall_tau
from netprobe.select.values import _last

__all__ = ["UNITS_PREFIX", "TYPE_PREFIX", "NO_FACTS", "layer_units", "layer_types", "stratum_labels", "width_confound"]

#: ``netprobe/layer_units/<layer>``: the units of a monitored layer (the columns of its activations)
UNITS_PREFIX = "netprobe/layer_units/"
#: ``netprobe/layer_type/<layer>/<Type>`` (1.0): the module type of a monitored layer
TYPE_PREFIX = "netprobe/layer_type/"
#: the stratum of the runs that logged no layer widths (logs of an older netprobe, or no monitor)
NO_FACTS = "layer widths not logged"


def layer_units(run: Run) -> Dict[str, int]:
    """``{layer: units}`` the run's monitors logged (``netprobe/layer_units/<layer>``), in the
    layers' forward order where ``netprobe/layer_index/<layer>`` tells it, else by name."""
    units = {tag[len(UNITS_PREFIX):]: _last(run, tag) for tag in run.scalars if tag.startswith(UNITS_PREFIX)}
    units = {k: int(v) for k, v in units.items() if v is not None and np.isfinite(v)}
    position = {k: _last(run, LAYER_INDEX_PREFIX + k) for k in units}
    return dict(sorted(units.items(), key=lambda kv: (position[kv[0]] is None, position[kv[0]] or 0.0, kv[0])))


def layer_types(run: Run) -> Dict[str, str]:
    """``{layer: module type}`` the run's monitors logged (``netprobe/layer_type/<layer>/<Type>``);
    a layer logged with several types (a run directory that holds fits of other models) gets them
    all, sorted and joined by ``|``, so it is comparable only to runs with the same set."""
    types: Dict[str, set] = {}
    for tag in run.scalars:
        rest = tag[len(TYPE_PREFIX):]
        if tag.startswith(TYPE_PREFIX) and "/" in rest:
            layer, kind = rest.rsplit("/", 1)
            types.setdefault(layer, set()).add(kind)
    return {layer: "|".join(sorted(kinds)) for layer, kinds in types.items()}


def _within_values(run: Run, within: Sequence[str]) -> List[str]:
    out = []
    for name in within:
        if name not in run.hparams:
            raise SelectionError(f"Expected every run to have the hyperparameter {name!r} named by within/--within, but "
                                 f"run {run.name!r} has {sorted(run.hparams) or 'none'}.")
        out.append(f"{name}={run.hparams[name]}")
    return out


def stratum_labels(runs: Sequence[Run], within: Sequence[str] = ()) -> Dict[str, str]:
    """``{run name: stratum label}``: the monitored layers with their module types, where logged,
    and widths (``"fc1(ReLU):64 fc2(ReLU):32"``; :data:`NO_FACTS` for a run that logged no
    widths), then each ``within`` hyperparameter's value."""
    labels = {}
    for r in runs:
        units, types = layer_units(r), layer_types(r)
        parts = [" ".join(f"{k}({types[k]}):{v}" if k in types else f"{k}:{v}" for k, v in units.items())
                 if units else NO_FACTS]
        labels[r.name] = ", ".join(parts + _within_values(r, within))
    return labels


def width_confound(signals: Sequence[float], runs: Sequence[Run]) -> Optional[Dict[str, Any]]:
    """Kendall's tau-b of a signal with the total width of the monitored layers over the runs that
    logged their widths (``None`` with fewer than 2): what an across-strata ranking mixes in."""
    pairs: List[Tuple[float, float]] = [(s, float(sum(layer_units(r).values()))) for s, r in zip(signals, runs)
                                        if layer_units(r)]
    if len(pairs) < 2:
        return None
    tau = kendall_tau([p[0] for p in pairs], [p[1] for p in pairs])
    return {"with": "total units of the monitored layers", "kendall_tau": None if np.isnan(tau) else float(tau),
            "n_runs": len(pairs)}
