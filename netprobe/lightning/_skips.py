"""What a measurement could not compute, and the warnings that say so: one per layer and cause
in a fit, naming which layers each mean ``netprobe/<metric>`` then covers."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from netprobe import distributed as _dist

__all__ = ["SkipReport"]


@dataclasses.dataclass(frozen=True)
class _Skip:
    """A value a measurement could not compute, told at the measurement's end.

    Attributes:
        layer: the layer.
        what: what was skipped (``"selectivity"``, ``"reliance_auc"``, ...).
        error: why.
        loud: this rank says why (the rank where it failed, or rank zero).
        metrics: the logged metrics it leaves without the layer's value (``None``: any of them).
    """

    layer: str
    what: str
    error: Exception
    loud: bool
    metrics: Optional[Tuple[str, ...]]


class SkipReport:
    """The values one monitor skipped at the running measurement (:meth:`note`), the coverage of
    its means (:attr:`coverage`), and what it already told in this fit (:attr:`warned`)."""

    def __init__(self) -> None:
        self.skips: List[_Skip] = []
        self.coverage: Dict[str, Tuple[List[str], List[str]]] = {}  # metric -> (layers with a value, layers expected)
        self.warned: set = set()  # (layer, metric) and (layer, what) already warned about in this fit

    def note(self, layer: str, what: str, err: Exception, loud: bool, metrics: Optional[Sequence[str]] = None) -> None:
        """``what`` could not be computed for ``layer`` (``err`` says why; ``loud``: this rank says
        so); ``metrics``: the logged metrics left without the layer's value (``None``: any)."""
        self.skips.append(_Skip(layer, what, err, loud, None if metrics is None else tuple(metrics)))

    def forget_measurement(self) -> None:
        """Drop what the running measurement noted (a new one begins)."""
        self.skips, self.coverage = [], {}

    def tell(self, name: str) -> None:
        """Warn about the values this measurement skipped, once per layer and metric in a fit.

        One warning per layer: why its values were skipped and, for each mean ``netprobe/<metric>``
        that lacks the layer, how many of the expected layers that mean covers and which it left
        out (the mean is over the layers with a value, so it can jump when one drops out). A layer
        whose every metric was already told about in this fit is not told again."""
        skips, coverage = self.skips, self.coverage
        self.skips, self.coverage = [], {}
        lacking = {m: [k for k in exp if k not in have] for m, (have, exp) in coverage.items()}
        layers = list(dict.fromkeys([s.layer for s in skips] + [k for miss in lacking.values() for k in miss]))
        for layer in layers:
            causes = [s for s in skips if s.layer == layer]
            new = [m for m, miss in lacking.items() if layer in miss and (layer, m) not in self.warned]
            # a cause whose metrics all kept the layer's value (or whose means are not covered, e.g. NaN
            # after a divergence) is told on its own, once per layer and cause
            alone = [s for s in causes if not any(layer in miss and (s.metrics is None or m in s.metrics) for m, miss in lacking.items())
                     and (layer, s.what) not in self.warned]
            loud = _dist.rank() == 0 or any(s.loud for s in causes)
            for s in alone:
                self.warned.add((layer, s.what))
                if s.loud:
                    warnings.warn(f"{name}: {s.what} for layer {layer!r} skipped this epoch: {s.error}", RuntimeWarning, stacklevel=2)
            if not new:
                continue
            self.warned.update((layer, m) for m in new)
            if not loud:
                continue
            why = [f"{s.what} for layer {layer!r} skipped this epoch: {str(s.error).rstrip('. ')}" for s in causes
                   if s not in alone and (s.metrics is None or any(m in s.metrics for m in new))]
            text = "; ".join(why) if why else f"no value for layer {layer!r} this epoch"
            # the metrics that lack the same layers share one sentence
            groups: Dict[Tuple[Tuple[str, ...], int], List[str]] = {}
            for m in new:
                groups.setdefault((tuple(lacking[m]), len(coverage[m][1])), []).append(m)
            said = []
            for (miss, total), ms in groups.items():
                keys, one = ", ".join(f"`netprobe/{m}`" for m in ms), len(ms) == 1
                if len(miss) < total:
                    said.append(f"the mean{'' if one else 's'} {keys} cover{'s' if one else ''} {total - len(miss)} of {total} layers "
                                f"this epoch (without {', '.join(repr(k) for k in miss)}): {'it averages' if one else 'they average'} "
                                "the other layers only, so a value can jump when a layer drops out or comes back "
                                "(`netprobe/<metric>/<layer>` shows each layer)")
                else:
                    said.append(f"{keys} {'is' if one else 'are'} not logged this epoch: no layer has a value (an EarlyStopping "
                                f"monitoring {'it' if one else 'one of them'} with strict=True raises; give it strict=False)")
            warnings.warn(f"{name}: {text}. So {'; and '.join(said)}. Said once per layer and metric in this fit.",
                          RuntimeWarning, stacklevel=2)
