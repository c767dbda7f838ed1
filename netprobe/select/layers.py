"""Which layer a layer alias names in a run: :func:`layer_order` (shallowest first, and where the
order comes from) and the resolution of ``netprobe/<metric>@deepest`` / ``@<layer>`` to a run's key.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from netprobe.select.events import Run
from netprobe.select.keys import LAYER_INDEX_PREFIX
from netprobe.select.values import _last


def layer_order(run: Run, metric: str) -> Tuple[List[str], Optional[str]]:
    """The layers of ``run`` with a ``netprobe/<metric>/<layer>`` key, shallowest first, and where
    the order comes from: ``"layer_index"`` (the ``netprobe/layer_index/<layer>`` scalars: positions
    in the forward pass), ``"single"`` (one layer); ``([...], None)`` when the logs do not tell (the
    layers sorted by name). The order in which the monitors' records appear is not used: it is the
    model's ``named_modules()`` registration order, which need not be the forward order."""
    prefix = f"netprobe/{metric}/"
    layers = sorted(t[len(prefix):] for t in run.scalars if t.startswith(prefix))
    if len(layers) <= 1:
        return layers, ("single" if layers else None)
    idx = {layer: _last(run, LAYER_INDEX_PREFIX + layer) for layer in layers}
    if all(v is not None and math.isfinite(v) for v in idx.values()):
        return sorted(layers, key=lambda layer: (idx[layer], layer)), "layer_index"
    return layers, None


_ORDER_SOURCES = {
    "layer_index": "by netprobe/layer_index (forward-pass position)",
    "single": "the only monitored layer",
}


def _resolve_key(run: Run, key: str) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """``(the run's key for a signal key, why not, the layer order's source)``: ``@deepest`` and
    ``@<layer>`` aliases become that run's ``netprobe/<metric>/<layer>``."""
    if "@" not in key:
        return key, None, None
    base, _, layer = key.partition("@")
    metric = base[len("netprobe/"):]
    if layer != "deepest":
        return f"{base}/{layer}", None, None
    layers, source = layer_order(run, metric)
    if not layers:
        return None, f"no per-layer {base}/<layer> key", None
    if source is None:
        return None, (f"the order of its {len(layers)} {base}/<layer> keys is not in its logs (pass the layer by name: "
                      f"{base}@<layer>, or --layer NAME)"), None
    return f"{base}/{layers[-1]}", None, source
