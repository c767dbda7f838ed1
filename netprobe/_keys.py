"""Facts about netprobe's logged metrics that both the monitors and the readers of their logs
need (see the keys table in docs/lightning.md): which are model-level, which direction is better,
which get a best-so-far key. The one place for metric directions. Knows nothing of Lightning.

Example:
    >>> metric_direction("reliance_auc"), metric_direction("pwcca_prev"), metric_direction("dead_fraction")
    ('max', 'max', 'min')
    >>> metric_direction("importance_selectivity_rho") is None
    True
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

__all__ = ["MODEL_LEVEL", "BEST_TRACKED", "DIRECTIONS", "HIGHER_SUFFIXES", "FACTS", "metric_direction"]

#: metrics of the whole model, logged as ``netprobe/<metric>`` only (no per-layer key)
MODEL_LEVEL = ("probe_accuracy",)

#: the key groups ``netprobe/<fact>/...`` that are facts of the run, not signals: a monitor's time,
#: and, once per fit, each monitored layer's position in the forward pass (``layer_index/<layer>``),
#: its units (``layer_units/<layer>``) and its module type (``layer_type/<layer>/<Type>``, 1.0)
FACTS = ("time", "layer_index", "layer_units", "layer_type")

#: the better direction of the named netprobe metrics: ``"max"`` (higher is better) or ``"min"``
#: (fewer dead units; less class selectivity tends to go with better generalization, Morcos et al.
#: 2018). The descriptors (``importance_*_rho``) have none.
DIRECTIONS: Mapping[str, str] = MappingProxyType({
    "reliance_auc": "max",
    "reliance_area": "max",
    "noise_auc": "max",
    "probe_accuracy": "max",
    "mutual_info_mean": "max",
    "selectivity_mean": "min",
    "dead_fraction": "min",
})

#: metric name endings that are higher-is-better: every ``*_auc``, and ``<method>_prev`` /
#: ``<method>_ref`` (a similarity: every method's direction is ``"max"``, see
#: ``netprobe.metrics.similarity._methods``)
HIGHER_SUFFIXES = ("_auc", "_prev", "_ref")

#: higher-is-better metrics whose best value so far over the run's measurements is also logged,
#: as ``netprobe/best/<metric>`` (the HParams tab shows it beside the final value, and orders its
#: metrics as listed here)
BEST_TRACKED = ("reliance_auc", "reliance_area", "noise_auc", "probe_accuracy")


def metric_direction(metric: str) -> Optional[str]:
    """The better direction of a netprobe metric name: ``"max"``, ``"min"``, or None (unknown, or a
    descriptor)."""
    if metric.endswith(HIGHER_SUFFIXES):
        return "max"
    return DIRECTIONS.get(metric)
