"""Key and condition text: what a signal spec, a layer alias and a ``where`` condition say.

Pure functions on strings (no run is read here): :func:`parse_signal` (``KEY[:min|max]``, globs,
``netprobe/<metric>@deepest`` / ``@<layer>`` aliases), :func:`parse_condition` (``KEY OP NUMBER``),
:func:`key_direction` (the known orientation of a netprobe key), and the tables behind them.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Optional, Tuple

from netprobe._keys import FACTS, metric_direction
from netprobe.select.errors import SelectionError

_GLOB_CHARS = set("*?[")


_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
_COND = re.compile(r"^\s*(?P<key>[^<>=!]+?)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<val>[^<>=!\s]+)\s*$")


def parse_condition(text: str) -> Tuple[str, str, float]:
    """``"KEY>=VALUE"`` (``>=``, ``<=``, ``>``, ``<``, ``==``, ``!=``) -> ``(key, op, value)``."""
    m = _COND.match(str(text))
    try:
        if m is None:
            raise ValueError
        value = float(m["val"])
        if not math.isfinite(value):
            raise ValueError
        return m["key"], m["op"], value
    except ValueError:
        raise SelectionError(
            f"Cannot read the condition {text!r}; write KEY OP NUMBER (a finite number) with OP one of >=, <=, >, <, "
            "==, != (e.g. 'netprobe/probe_accuracy>=0.99')."
        ) from None


#: ``netprobe/<name>/...`` scalars that are not signals of the network: the monitors' timing, the layer order
_NOT_SIGNALS = FACTS
#: ``netprobe/layer_index/<layer>``: a layer's position in the forward pass, when the monitors log it
LAYER_INDEX_PREFIX = "netprobe/layer_index/"


def _netprobe_parts(key: str) -> Optional[Tuple[str, Optional[str]]]:
    """``netprobe/<metric>[/<layer>]`` -> ``(metric, layer or None)``; None for another key. The
    monitors' best-so-far ``netprobe/best/<metric>`` is the metric ``"best/<metric>"``."""
    if not key.startswith("netprobe/"):
        return None
    rest = key[len("netprobe/"):]
    prefix = ""
    if rest.startswith("best/"):
        prefix, rest = "best/", rest[len("best/"):]
    metric, _, layer = rest.partition("/")
    return (prefix + metric, layer or None) if metric else None


def key_direction(key: str) -> Optional[str]:
    """The known orientation of a signal key: ``"max"`` (higher is better), ``"min"``, or None.

    Known for the netprobe keys, from their metric's direction in :mod:`netprobe._keys`: higher is
    better for every ``*_auc``, ``*_prev``, ``*_ref``, ``reliance_area``, ``probe_accuracy`` and
    ``mutual_info_mean``; lower for ``selectivity_mean`` and ``dead_fraction``;
    ``netprobe/best/<metric>`` (the best value so far) as ``<metric>``. Of
    the other keys, one with a word ``loss`` (words split at ``/ _ - .``: ``train/loss``,
    ``val_loss_epoch``) is lower-is-better and one with a word ``acc`` or ``accuracy``
    (``test/acc``, ``val_accuracy``) higher-is-better; any other key (or one with both words) has
    no known direction: name it ``KEY:min`` or ``KEY:max``.

    Example:
        >>> key_direction("netprobe/reliance_auc/fc1"), key_direction("netprobe/dead_fraction"), key_direction("train/loss")
        ('max', 'min', 'min')
        >>> key_direction("test/acc"), key_direction("lr-Adam")
        ('max', None)
    """
    text = str(key).split("@", 1)[0]
    parts = _netprobe_parts(text)
    if parts is None:
        words = set(re.split(r"[/_\-.]", text.lower()))
        lower, higher = "loss" in words, bool(words & {"acc", "accuracy"})
        return "min" if lower and not higher else "max" if higher and not lower else None
    if parts[0] in _NOT_SIGNALS:
        return None
    metric = parts[0][len("best/"):] if parts[0].startswith("best/") else parts[0]  # the best so far: the metric's direction
    return metric_direction(metric)


def parse_signal(text: str) -> Tuple[str, Optional[str]]:
    """``"KEY"``, ``"KEY:min"`` or ``"KEY:max"`` -> ``(KEY, direction or None)``.

    ``KEY`` may be a glob pattern (``netprobe/*``) or a layer alias ``netprobe/<metric>@deepest``
    / ``netprobe/<metric>@<layer>`` (per run, that layer's ``netprobe/<metric>/<layer>``).

    Example:
        >>> parse_signal("train/loss:min"), parse_signal("netprobe/reliance_auc@deepest")
        (('train/loss', 'min'), ('netprobe/reliance_auc@deepest', None))
    """
    text = str(text).strip()
    key, sep, d = text.rpartition(":")
    if sep and d in ("min", "max"):
        text, direction = key.strip(), d
    else:
        direction = None
    if not text:
        raise SelectionError(f"Expected a signal key such as 'netprobe/reliance_auc' or 'train/loss:min', but got {text!r}.")
    if "@" in text:
        base, _, layer = text.partition("@")
        parts = _netprobe_parts(base)
        if parts is None or parts[1] is not None or not layer or "@" in layer:
            raise SelectionError(
                f"Expected a layer alias of the form 'netprobe/<metric>@deepest' or 'netprobe/<metric>@<layer>', but got "
                f"{text!r}. The alias takes a netprobe metric without its layer (e.g. 'netprobe/reliance_auc@deepest')."
            )
    return text, direction
