"""Representation metrics as pure functions on tensors.

Conventions (see the README's "Metrics" section): inputs are ``(n_samples, n_features)``,
computation is float64 whatever the input dtype, similarities lie in ``[0, 1]``, every option
after the tensors is keyword-only, and randomness comes from a caller-owned ``torch.Generator``.

Names are resolved lazily (PEP 562) so ``import netprobe.metrics`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # the contract of the streaming accumulators
    "Accumulator": "_accumulator",
    # representational similarity (+ streaming accumulator)
    "cca": "similarity",
    "svcca": "similarity",
    "pwcca": "similarity",
    "linear_cka": "similarity",
    "rbf_cka": "similarity",
    "procrustes": "similarity",
    "similarity_matrix": "similarity",
    "SimilarityMatrix": "similarity",
    "SimilarityAccumulator": "similarity",
    "MinibatchCKA": "similarity",
    # class selectivity and information
    "class_selectivity": "selectivity",
    "SelectivityResult": "selectivity",
    "SelectivityAccumulator": "selectivity",
    "mutual_information": "information",
    "MutualInfoAccumulator": "information",
    # single-direction reliance
    "ablation_curve": "reliance",
    "noise_curve": "reliance",
    "CurveResult": "reliance",
    "NonFiniteError": "reliance",
    # single-unit importance
    "unit_importance": "reliance",
    "ImportanceResult": "reliance",
    "spearman": "reliance",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'netprobe.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
