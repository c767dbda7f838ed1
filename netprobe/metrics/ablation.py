"""The former home of the ablation and noise curves (now :mod:`netprobe.metrics.reliance`); their
names are importable from here too."""

from netprobe.metrics.reliance import (
                                       DEFAULT_FRACTIONS,
                                       DEFAULT_MAX_ELEMENTS,
                                       DEFAULT_SCALES,
                                       CurveResult,
                                       Data,
                                       LossFn,
                                       MaxElements,
                                       NonFiniteError,
                                       Observe,
                                       ablation_curve,
                                       noise_curve,
                                       score,
                                       selectivity_order,
)

__all__ = ["ablation_curve", "noise_curve", "CurveResult", "score", "selectivity_order", "NonFiniteError", "DEFAULT_FRACTIONS",
           "DEFAULT_SCALES", "DEFAULT_MAX_ELEMENTS", "Data", "LossFn", "MaxElements", "Observe"]
