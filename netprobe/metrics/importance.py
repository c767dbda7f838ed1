"""The former home of unit importance (now :mod:`netprobe.metrics.reliance.importance`); its
names are importable from here too."""

from netprobe.metrics.reliance.importance import ImportanceResult, spearman, unit_importance

__all__ = ["unit_importance", "ImportanceResult", "spearman"]
