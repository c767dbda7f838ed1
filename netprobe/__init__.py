"""netprobe: watch a network's hidden representations while it trains.

Three ways in:

* ``netprobe.probe(model, layers, capacity=...)``: capture activations in plain PyTorch code;
* ``netprobe.metrics``: CCA / SVCCA / PWCCA / linear CKA, class selectivity, mutual information,
  ablation and noise curves, as functions on tensors;
* ``netprobe.lightning``: callbacks that log those signals every epoch.
"""

from __future__ import annotations

__version__ = "0.1.0"

from netprobe import metrics  # noqa: E402  (lazy: cheap)
from netprobe.layers import LayoutDecisions  # noqa: E402
from netprobe.capture import Probe, RingBuffer, probe  # noqa: E402

__all__ = ["probe", "Probe", "RingBuffer", "LayoutDecisions", "metrics", "__version__"]
