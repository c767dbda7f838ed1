"""Single-direction reliance (Morcos et al. 2018): cumulative ablation and noise-robustness curves.

Measure reliance on the TRAINING data with the labels the network was trained on. On held-out
data a memorizing network is near chance before any ablation, so its normalized curve is flat and
the signal inverts (a network that memorized looks robust). The papers' finding is that networks
that generalize are *less* reliant on single directions: their training-set accuracy degrades
slowly as units are ablated, giving a larger area under the curve.

Both functions evaluate the model under ``torch.no_grad()`` in eval mode and leave it exactly as
they found it (every module's training flag, parameters, buffers, hooks, the global RNG).
Randomness (unit orders, noise) comes from the caller's ``torch.Generator`` only.

Vectorization: instead of one forward pass per ablation mask, a batch of ``b`` inputs is repeated
``m`` times and ``m`` different masks are applied at the layer in one forward pass (``m`` chosen so
that ``m * b <= max_batch`` and that no module output of the stacked pass holds more than
``max_elements`` elements, measured per input row on a few rows of the first batch). This assumes the model treats samples independently in eval mode,
which holds for standard layers (eval-mode BatchNorm and Dropout included), not for layers that mix
samples across the batch.
"""

from netprobe.metrics.reliance._inputs import DEFAULT_MAX_ELEMENTS, Data, LossFn, MaxElements, NonFiniteError, Observe
from netprobe.metrics.reliance.ablation import DEFAULT_FRACTIONS, ablation_curve, selectivity_order
from netprobe.metrics.reliance.importance import ImportanceResult, spearman, unit_importance
from netprobe.metrics.reliance.noise import DEFAULT_SCALES, noise_curve
from netprobe.metrics.reliance.result import CurveResult, score

__all__ = ["ablation_curve", "noise_curve", "unit_importance", "CurveResult", "ImportanceResult", "score", "spearman",
           "selectivity_order", "NonFiniteError", "DEFAULT_FRACTIONS", "DEFAULT_SCALES", "DEFAULT_MAX_ELEMENTS", "Data",
           "LossFn", "MaxElements", "Observe"]
