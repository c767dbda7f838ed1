"""Rank the runs of a sweep by a logged netprobe signal, and check the ranking against a reference.

A *run* is a directory holding TensorBoard event files (``events.out.tfevents.*``). Its scalars
are read with TensorBoard's own event-reading code; event files in sub-directories of a run (as
``SummaryWriter.add_hparams`` writes them) belong to that run. Hyperparameters come from the
HParams plugin data in the events and from Lightning's ``hparams.yaml`` beside them.

Which value of a series is used (``at``):

* ``"last"``: the value at the largest step;
* ``"best"``: the best value (max or min by ``mode``);
* an int ``E``: the value logged during epoch ``E`` (0-based). When the run also logged an
  ``epoch`` scalar (Lightning does), steps map to epochs through it; otherwise the ``E``-th logged
  value of the series is taken. A run that stopped before epoch ``E`` is skipped, with the reason.

The reference (``against``, e.g. a test accuracy logged once at the end) is read at its last value.

Conditions (``where``, e.g. ``"netprobe/probe_accuracy>=0.99"``) keep only the runs that meet
them; each is read at the same epoch as the signal when ``at`` is an epoch, at each
measurement's epoch with ``"best"`` (the best value among the measurements that meet them; at the
same step when no ``epoch`` scalar was logged), else at its last value; a key logged only after
that epoch (a test accuracy at the end) is read at its last value. A run that fails a condition, or lacks its key, is listed as skipped with the
reason. NaN values (what the monitors log for a diverged network) count as no signal: such a run
is skipped at its last value and its NaN measurements never count as best.
Reliance should be compared between networks that fit their training data about equally well
(its AUC is normalized by the unablated accuracy, so an underfit network scores high): filter on
``netprobe/probe_accuracy``, which ``RelianceMonitor`` logs beside it.

A run with a corrupt or truncated event file (a record whose checksum fails, or that ends early)
is skipped, with the reason: TensorBoard's reader stops at such a record without a word, and the
values before it would misrepresent the run.

Statistics over the runs that have both values: Spearman's rho and Kendall's tau-b between signal
and reference, oriented by ``mode`` and ``against_mode`` so that a positive value means agreement
(ties handled; written here in numpy and tested against scipy), the reference rank of
the run the signal picks, and **top-k hit probabilities**: draw ``n_draws`` random subsets of
``subset_size`` runs (without replacement, a seeded numpy Generator), pick the run with the best
signal in each subset, and count how often it is among the ``k`` best runs *of that subset* by the
reference. With ``subset_size`` equal to the number of runs this is the exact 0/1 outcome of
picking among all runs. Morcos et al.'s talk reports, for choosing among 48 configurations by
ablation robustness, the pick in the top 5 by test accuracy 83 % of the time and in the top 10
98 %: the same quantity with subsets of 48 drawn from a larger pool.

Beside each hit rate, a random pick's rate ``k / m``; percentile bootstrap intervals over runs
(:func:`bootstrap_intervals`) on rho, tau and the hit rates. Runs whose ``netprobe/probe_accuracy``
is far below the others' are flagged (not dropped).

**Several seeds per configuration** (``group=`` a regex on the run names, ``group_by=``
hyperparameter names: :func:`group_labels`): the bootstrap resamples groups (a cluster bootstrap)
and the cross-validation splits groups, since the seeds of one configuration are not independent
runs. :func:`tau_difference` (``rank_signals(compare=...)``) gives tau(A) - tau(B) with a paired
bootstrap interval.

**Which signal to trust** (:func:`rank_signals`, ``netprobe rank --signals/--baseline``): one row
per signal (every netprobe key the runs logged, glob patterns, ``KEY:min``/``KEY:max`` baselines
such as the training loss), and a cross-validated choice (:func:`cross_validate_choice`): choose the
signal with the best tau on half of the runs, judge it on the other half, over random splits.
Choosing on the runs it is judged on would overfit.

**Layers**: ``netprobe/<metric>@deepest`` reads, per run, the deepest monitored layer's key (the
order from ``netprobe/layer_index/<layer>`` scalars when logged, else from the order of the
monitors' records in the event files: :func:`layer_order`); ``@<layer>`` names one.

Everything returned is plain data (dicts, lists, floats).
"""

from __future__ import annotations

import bisect
import fnmatch
import math
import operator
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from netprobe._validation import close_names

__all__ = ["SelectionError", "Run", "find_runs", "load_run", "load_runs", "rank_runs", "rank_signals", "parse_condition", "parse_signal",
           "key_direction", "layer_order", "spearman_rho", "kendall_tau", "top_k_hits", "bootstrap_intervals", "cross_validate_choice",
           "tau_difference", "group_labels"]

_GLOB_CHARS = set("*?[")


class SelectionError(ValueError):
    """A user error when ranking runs (no runs, unknown metric, ...); the message says what to do."""


@dataclass
class Run:
    name: str
    path: str
    scalars: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)  # tag -> [(step, value)] by step
    hparams: Dict[str, Any] = field(default_factory=dict)
    #: why the run cannot be ranked (a corrupt or truncated event file), else None
    error: Optional[str] = None
    #: metric -> its layers in the order the monitors logged them (``netprobe/<metric>/<layer>`` keys)
    logged_order: Dict[str, List[str]] = field(default_factory=dict)


def _is_event_file(name: str) -> bool:
    return name.startswith("events.out.tfevents")


def find_runs(logdir: Union[str, os.PathLike]) -> List[str]:
    """Run directories under ``logdir`` (directories with event files whose ancestors have none)."""
    logdir = os.fspath(logdir)
    if not os.path.isdir(logdir):
        raise SelectionError(f"{logdir!r} is not a directory. Pass the directory holding the sweep's runs.")
    dirs = sorted(root for root, _, files in os.walk(logdir) if any(_is_event_file(f) for f in files))
    runs: List[str] = []
    for d in dirs:
        if not any(d != r and d.startswith(r.rstrip(os.sep) + os.sep) for r in runs):
            runs.append(d)
    return runs


def _hparams_from_plugin(acc: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    try:
        from tensorboard.plugins.hparams import plugin_data_pb2

        content = acc.PluginTagToContent("hparams")
    except (ImportError, KeyError):
        return out
    for raw in content.values():
        try:
            data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        except Exception:  # noqa: BLE001 - unreadable plugin data is skipped
            continue
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                kind = v.WhichOneof("kind")
                out[k] = getattr(v, kind) if kind else None
    return out


def _hparams_from_yaml(path: str) -> Dict[str, Any]:
    f = os.path.join(path, "hparams.yaml")
    if not os.path.isfile(f):
        return {}
    try:
        import yaml

        with open(f) as fh:
            data = yaml.safe_load(fh) or {}
        return {str(k): v for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None}
    except Exception:  # noqa: BLE001 - a malformed yaml leaves hparams empty, never fails the ranking
        return {}


def _check_event_file(path: str) -> Optional[str]:
    """Why the TFRecord file at ``path`` cannot be read to its end (None when it can)."""
    return _scan_event_file(path)[0]


def _scan_event_file(path: str) -> Tuple[Optional[str], List[Tuple[int, str]]]:
    """``(why the TFRecord file at path cannot be read to its end or None, [(step, tag)] of its
    ``netprobe/`` summary values in record order)``.

    TensorBoard's reader stops silently at the first corrupt or truncated record (it takes it for
    a record still being written), which would rank a run by the values logged before it. Each
    record is ``uint64 length, uint32 masked CRC-32C of the length, data, uint32 masked CRC-32C of
    the data``; every checksum is verified here. The record order of the ``netprobe/`` tags is the
    order in which the monitors logged their layers (see :func:`layer_order`).
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    name = os.path.basename(path)
    seq: List[Tuple[int, str]] = []
    try:
        with open(path, "rb") as fh:
            offset = 0
            while True:
                head = fh.read(12)
                if not head:
                    return None, seq
                if len(head) < 12:
                    return f"truncated record at byte {offset} of {name}", seq
                if struct.unpack("<I", head[8:])[0] != masked_crc32c(head[:8]):
                    return f"corrupt record at byte {offset} of {name} (length checksum mismatch)", seq
                (length,) = struct.unpack("<Q", head[:8])
                data = fh.read(length)
                crc = fh.read(4)
                if len(data) < length or len(crc) < 4:
                    return f"truncated record at byte {offset} of {name}", seq
                if struct.unpack("<I", crc)[0] != masked_crc32c(data):
                    return f"corrupt record at byte {offset} of {name} (data checksum mismatch)", seq
                if b"netprobe/" in data:
                    try:
                        ev = event_pb2.Event.FromString(data)
                        seq.extend((int(ev.step), v.tag) for v in ev.summary.value if v.tag.startswith("netprobe/"))
                    except Exception:  # noqa: BLE001 - an unparsable event only loses its order information
                        pass
                offset += 16 + length
    except OSError as err:
        return f"cannot read {name}: {err}", seq


def load_run(path: str, name: Optional[str] = None) -> Run:
    """Read every scalar and the hyperparameters of the run at ``path`` (sub-directories included).

    An event file with a corrupt or truncated record sets ``run.error`` (the run is then skipped by
    :func:`rank_runs`, with that reason): its values after the bad record are lost, so whatever was
    read before it would misrepresent the run.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Run(name or os.path.basename(os.path.normpath(path)), path)
    series: Dict[str, Dict[int, float]] = {}
    seq: List[Tuple[int, str]] = []
    for root, _, files in sorted(os.walk(path)):
        if not any(_is_event_file(f) for f in files):
            continue
        for f in sorted(files):
            if not _is_event_file(f):
                continue
            why, tags = _scan_event_file(os.path.join(root, f))
            seq.extend(tags)
            if why and run.error is None:
                rel = os.path.relpath(root, path)
                run.error = (why if rel == "." else f"{why} in {rel}") + \
                    " (the values after it are lost; rerun or delete the run, or move the file away)"
        acc = EventAccumulator(root, size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            s = series.setdefault(tag, {})
            for ev in acc.Scalars(tag):
                if tag == "epoch":  # the first write at a step wins: `trainer.test()` after `fit` logs the
                    s.setdefault(int(ev.step), float(ev.value))  # next epoch's number at the last step
                else:
                    s[int(ev.step)] = float(ev.value)  # a later write at the same step wins
        run.hparams.update(_hparams_from_plugin(acc))
        run.hparams.update(_hparams_from_yaml(root))
    run.scalars = {t: sorted(v.items()) for t, v in series.items()}
    run.logged_order = _logged_layer_order(seq, run.scalars)
    return run


def load_runs(logdir: Union[str, os.PathLike]) -> List[Run]:
    paths = find_runs(logdir)
    if not paths:
        raise SelectionError(
            f"No runs under {os.fspath(logdir)!r}: no TensorBoard event files (events.out.tfevents.*) were found. "
            "Point LOGDIR at the directory that holds one sub-directory per run."
        )
    base = os.fspath(logdir)
    return [load_run(p, os.path.relpath(p, base) if p != base else os.path.basename(base)) for p in paths]


def _value_at(run: Run, tag: str, at: Union[str, int], mode: str) -> Tuple[Optional[float], Optional[str]]:
    s = run.scalars.get(tag)
    if not s:
        return None, f"no {tag!r}"
    if at == "last":
        return s[-1][1], None
    if at == "best":
        vals = [v for _, v in s if math.isfinite(v)]  # NaN = a measurement of a diverged network
        if not vals:
            return None, f"no finite {tag!r}"
        return (max(vals) if mode == "max" else min(vals)), None
    epoch = int(at)
    ep = run.scalars.get("epoch")
    if ep:
        steps = {st for st, v in ep if int(round(v)) == epoch}
        hits = [v for st, v in s if st in steps]
        if hits:
            return hits[-1], None
        last_epoch = int(round(max(v for _, v in ep)))
        if last_epoch < epoch:
            return None, f"stopped before epoch {epoch} (last epoch {last_epoch})"
        return None, f"no {tag!r} at epoch {epoch}"
    if epoch < len(s):
        return s[epoch][1], None
    return None, f"stopped before epoch {epoch} ({len(s)} values of {tag!r})"


def _last(run: Run, tag: str) -> Optional[float]:
    s = run.scalars.get(tag)
    return s[-1][1] if s else None


def _epoch_of_step(run: Run, step: int) -> Optional[int]:
    """The epoch a step belongs to, from the ``epoch`` scalar (its value at or before ``step``)."""
    ep = run.scalars.get("epoch", [])  # sorted by step, one value per step
    i = bisect.bisect_right(ep, (step, math.inf))
    return int(round(ep[i - 1][1])) if i else None


def _condition_value(run: Run, tag: str, epoch: Optional[int]) -> Optional[float]:
    """A condition's value at ``epoch`` (its last value when ``epoch`` is None). A key first
    logged after that epoch (e.g. a test accuracy logged once at the end) is read at its last value."""
    if epoch is None or not run.scalars.get("epoch"):
        return _last(run, tag)
    v, _ = _value_at(run, tag, epoch, "max")
    if v is not None:
        return v
    epochs = [_epoch_of_step(run, st) for st, _ in run.scalars.get(tag, [])]
    if epochs and all(e is not None and e > epoch for e in epochs):
        return _last(run, tag)
    return None


def _holds(c: Optional[float], op: str, val: float) -> bool:
    return c is not None and math.isfinite(c) and _OPS[op](c, val)


def _best_where(run: Run, tag: str, mode: str, conds: Sequence[Tuple[str, str, float]]) -> Tuple[Optional[float], Optional[str]]:
    """The best finite value of ``tag`` among its measurements at which every condition holds (each
    condition read at the measurement's epoch, or at the same step when no ``epoch`` is logged), so
    that ``--at best --where probe_accuracy>=x`` never picks a value from before the network fit."""
    s = run.scalars.get(tag)
    if not s:
        return None, f"no {tag!r}"
    by_epoch = bool(run.scalars.get("epoch"))
    ok = []
    for step, v in s:
        if not math.isfinite(v):
            continue
        if by_epoch:
            e = _epoch_of_step(run, step)
            vals = [(_condition_value(run, key, e), op, val) for key, op, val in conds]
        else:
            vals = [(next((c for st, c in reversed(run.scalars.get(key, [])) if st <= step), _last(run, key)), op, val)
                    for key, op, val in conds]
        if all(_holds(c, op, val) for c, op, val in vals):
            ok.append(v)
    if not ok:
        cond = " and ".join(f"{k}{op}{v:g}" for k, op, v in conds)
        return None, f"no measurement of {tag!r} with {cond}"
    return (max(ok) if mode == "max" else min(ok)), None


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


# ----------------------------------------------------------------------------- signal keys
#: netprobe metrics whose higher value is better, and name endings that say so (README's logged keys)
_HIGHER_BETTER = ("reliance_area", "probe_accuracy", "mutual_info_mean")
_HIGHER_SUFFIXES = ("_auc", "_prev", "_ref")
#: netprobe metrics whose lower value is better (README's logged keys: fewer dead units; less class
#: selectivity tends to go with better generalization, Morcos et al. 2018)
_LOWER_BETTER = ("selectivity_mean", "dead_fraction")
#: ``netprobe/<name>/...`` scalars that are not signals of the network: the monitors' timing, the layer order
_NOT_SIGNALS = ("time", "layer_index")
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

    Known for the netprobe keys: higher is better for every ``*_auc``, ``*_prev``, ``*_ref``,
    ``reliance_area``, ``probe_accuracy`` and ``mutual_info_mean``; lower for ``selectivity_mean``
    and ``dead_fraction``; ``netprobe/best/<metric>`` (the best value so far) as ``<metric>``. Any other key (``train/loss``, a metric netprobe does not know) has no
    known direction: name it ``KEY:min`` or ``KEY:max``.

    Example:
        >>> key_direction("netprobe/reliance_auc/fc1"), key_direction("netprobe/dead_fraction"), key_direction("train/loss")
        ('max', 'min', None)
    """
    parts = _netprobe_parts(str(key).split("@", 1)[0])
    if parts is None or parts[0] in _NOT_SIGNALS:
        return None
    metric = parts[0][len("best/"):] if parts[0].startswith("best/") else parts[0]  # the best so far: the metric's direction
    if metric in _HIGHER_BETTER or metric.endswith(_HIGHER_SUFFIXES):
        return "max"
    if metric in _LOWER_BETTER:
        return "min"
    return None


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


def _logged_layer_order(seq: Sequence[Tuple[int, str]], scalars: Mapping[str, Any]) -> Dict[str, List[str]]:
    """metric -> its layers in the order of the event records at a step where all of them were
    logged (the monitors log their layers in ``model.named_modules()`` order, one record per key);
    a metric none of whose steps logged every one of its layers gets no order."""
    steps: Dict[str, Dict[int, List[str]]] = {}
    for step, tag in seq:
        parts = _netprobe_parts(tag)
        if parts is None or parts[1] is None or parts[0] in _NOT_SIGNALS or tag not in scalars:
            continue
        layers = steps.setdefault(parts[0], {}).setdefault(step, [])
        if parts[1] not in layers:
            layers.append(parts[1])
    out: Dict[str, List[str]] = {}
    for metric, by_step in steps.items():
        every = {layer for layers in by_step.values() for layer in layers}
        full = [layers for _, layers in sorted(by_step.items()) if len(layers) == len(every)]
        if full:
            out[metric] = list(full[0])
    return out


def layer_order(run: Run, metric: str) -> Tuple[List[str], Optional[str]]:
    """The layers of ``run`` with a ``netprobe/<metric>/<layer>`` key, shallowest first, and where
    the order comes from: ``"layer_index"`` (the ``netprobe/layer_index/<layer>`` scalars: positions
    in the forward pass), ``"logged"`` (the order of the monitors' records in the event files, which
    is the model's ``named_modules()`` registration order), ``"single"`` (one layer); ``([...], None)``
    when the logs do not tell (the layers sorted by name)."""
    prefix = f"netprobe/{metric}/"
    layers = sorted(t[len(prefix):] for t in run.scalars if t.startswith(prefix))
    if len(layers) <= 1:
        return layers, ("single" if layers else None)
    idx = {layer: _last(run, LAYER_INDEX_PREFIX + layer) for layer in layers}
    if all(v is not None and math.isfinite(v) for v in idx.values()):
        return sorted(layers, key=lambda layer: (idx[layer], layer)), "layer_index"
    logged = run.logged_order.get(metric, [])
    if sorted(logged) == layers:
        return list(logged), "logged"
    return layers, None


_ORDER_SOURCES = {
    "layer_index": "by netprobe/layer_index (forward-pass position)",
    "logged": "the last layer the monitors logged (model.named_modules() registration order)",
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


# ----------------------------------------------------------------------------- statistics
def _rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=float)
    sa = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sa[j + 1] == sa[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks); NaN if a side is constant."""
    ra, rb = _rankdata(np.asarray(a, float)), _rankdata(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_a)(n0 - ties_b)), O(n^2)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), 1)
    dx, dy = dx[iu], dy[iu]
    s = float((dx * dy).sum())
    den = np.sqrt(float((dx != 0).sum()) * float((dy != 0).sum()))
    return float(s / den) if den > 0 else float("nan")


def top_k_hits(
    signal: Sequence[float], reference: Sequence[float], ks: Iterable[int], *, mode: str = "max",
    reference_mode: str = "max", subset_size: Optional[int] = None, n_draws: int = 10_000, seed: int = 0,
) -> Dict[int, float]:
    """Probability that the run with the best signal in a random subset is in that subset's top ``k``
    by the reference (module docstring). Ties are broken at random, in expectation: a tie for the
    best signal averages over the tied runs, and a run tied with ``e`` others by the reference, with
    ``b`` runs strictly better, is in the top ``k`` with probability ``clip((k - b) / (e + 1), 0, 1)``."""
    _check_directions(mode, reference_mode)
    sig = np.asarray(signal, float) * (1 if mode == "max" else -1)
    ref = np.asarray(reference, float) * (1 if reference_mode == "max" else -1)
    n = len(sig)
    m = n if subset_size is None else int(subset_size)
    if not 1 <= m <= n:
        raise SelectionError(f"Expected `subset_size` in [1, {n}] (the number of runs), but got {subset_size}.")
    if not isinstance(n_draws, int) or n_draws < 1:
        raise SelectionError(f"Expected `n_draws` to be an int >= 1 (resampled subsets), but got {n_draws!r}.")
    rng = np.random.default_rng(seed)
    draws = 1 if m == n else n_draws
    ks = sorted(set(int(k) for k in ks))
    hits = {k: 0.0 for k in ks}
    for _ in range(draws):
        idx = np.arange(n) if m == n else np.sort(rng.choice(n, size=m, replace=False))
        s = sig[idx]
        picks = idx[s == s.max()]  # the runs tied for the best signal, each picked with equal chance
        for pick in picks:
            better = int((ref[idx] > ref[pick]).sum())  # strictly better by the reference
            equal = int((ref[idx] == ref[pick]).sum()) - 1  # tied with it (itself excluded)
            for k in ks:
                hits[k] += min(1.0, max(0.0, (k - better) / (equal + 1))) / len(picks)
    return {k: hits[k] / draws for k in ks}


def _chunks(rows: int, n: int) -> Iterable[slice]:
    step = max(1, 2_000_000 // max(1, n * n))  # bound the (rows, n, n) comparison arrays (~16 MB each)
    for i in range(0, rows, step):
        yield slice(i, min(rows, i + step))


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair of ``x``, ``y`` ``(rows, n)``; NaN where a row is constant."""
    out = np.empty(len(x))
    iu = np.triu_indices(x.shape[1], 1)
    for sl in _chunks(len(x), x.shape[1]):
        dx = np.sign(x[sl, :, None] - x[sl, None, :])[:, iu[0], iu[1]]
        dy = np.sign(y[sl, :, None] - y[sl, None, :])[:, iu[0], iu[1]]
        den = np.sqrt((dx != 0).sum(1).astype(float) * (dy != 0).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[sl] = np.where(den > 0, (dx * dy).sum(1) / den, np.nan)
    return out


def _avg_ranks_rows(x: np.ndarray) -> np.ndarray:
    less = (x[:, None, :] < x[:, :, None]).sum(-1)
    equal = (x[:, None, :] == x[:, :, None]).sum(-1)  # itself included
    return less + (equal + 1) / 2.0


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho (average ranks) of each row pair; NaN where a row is constant."""
    out = np.empty(len(x))
    for sl in _chunks(len(x), x.shape[1]):
        rx, ry = _avg_ranks_rows(x[sl]), _avg_ranks_rows(y[sl])
        rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
        den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[sl] = np.where(den > 0, (rx * ry).sum(1) / den, np.nan)
    return out


def _check_directions(mode: str, reference_mode: str) -> None:
    if mode not in ("max", "min") or reference_mode not in ("max", "min"):
        raise SelectionError(f"Expected `mode` and `reference_mode` to be 'max' or 'min', but got {mode!r}, {reference_mode!r}.")


def _first_copies(ids: np.ndarray) -> np.ndarray:
    """``(rows, L)`` bool: the first entry of each run id in its row (a bootstrap draws runs with
    replacement: copies of one run are one run, not a tie)."""
    first = np.ones(ids.shape, dtype=bool)
    for sl in _chunks(len(ids), ids.shape[1]):
        a = ids[sl]
        earlier = np.tril(np.ones((a.shape[1], a.shape[1]), dtype=bool), -1)  # [j, l]: l < j
        first[sl] = ~((a[:, :, None] == a[:, None, :]) & earlier[None]).any(-1)
    return first


def _hit_credit_rows(sig: np.ndarray, ref: np.ndarray, ks: Sequence[int], ids: Optional[np.ndarray] = None) -> np.ndarray:
    """``(rows, len(ks))``: for each row (a set of runs, both sides oriented so that higher is
    better), the chance that the best-signal run is in the row's top ``k`` by the reference, ties
    broken at random in expectation (as :func:`top_k_hits`). ``ids`` ``(rows, L)``: which run each
    entry is (bootstrap copies of one run count once, and are never a tie with each other)."""
    return _hit_credit_masked(sig, ref, np.ones(sig.shape, dtype=bool), ks, ids)


def _group_codes(groups: Optional[Sequence[Any]], n: int) -> Optional[np.ndarray]:
    """Group labels -> integer codes ``0..G-1`` (in sorted order of the labels' strings); None stays None."""
    if groups is None:
        return None
    labels = [str(g) for g in groups]
    if len(labels) != n:
        raise SelectionError(f"Expected one group label per run ({n}), but got {len(labels)}.")
    uniq = sorted(set(labels))
    code = {g: i for i, g in enumerate(uniq)}
    return np.array([code[g] for g in labels], dtype=np.int64)


def _cluster_draws(codes: np.ndarray, n_boot: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cluster bootstrap: each replicate draws the ``G`` groups with replacement
    (``rng.integers(0, G, size=(n_boot, G))``) and takes every run of each drawn group, in the
    order drawn (a group's runs in their order). Returns ``(idx, draw, valid)``, each ``(n_boot, L)``
    with ``L`` the largest replicate's size: the runs, which draw (0..G-1) each came from, and
    which entries are real (the rest is padding)."""
    n_groups = int(codes.max()) + 1
    members = [np.flatnonzero(codes == g) for g in range(n_groups)]
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    sizes = np.array([len(m) for m in members])
    lengths = sizes[draws].sum(1)
    width = int(lengths.max())
    idx = np.zeros((n_boot, width), dtype=np.int64)
    draw = np.full((n_boot, width), -1, dtype=np.int64)
    valid = np.zeros((n_boot, width), dtype=bool)
    for b in range(n_boot):
        parts = [members[g] for g in draws[b]]
        cat = np.concatenate(parts)
        idx[b, : len(cat)] = cat
        draw[b, : len(cat)] = np.repeat(np.arange(n_groups), [len(q) for q in parts])
        valid[b, : len(cat)] = True
    return idx, draw, valid


def _kendall_rows_grouped(x: np.ndarray, y: np.ndarray, codes: np.ndarray, draw: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row of a cluster-bootstrap replicate (``x``, ``y``, ``codes``, ``draw``,
    ``valid`` all ``(rows, L)``) over its pairs ``i < j`` of real entries, leaving out the pairs of two
    runs of the same group that came from two different draws of it (kept, they would count each
    within-group pair once per pair of copies, over-weighting the seed-to-seed pairs; a pair of
    copies of one run is tied on both sides and never counts)."""
    out = np.empty(len(x))
    iu = np.triu_indices(x.shape[1], 1)
    for sl in _chunks(len(x), x.shape[1]):
        dx = np.sign(x[sl, :, None] - x[sl, None, :])[:, iu[0], iu[1]]
        dy = np.sign(y[sl, :, None] - y[sl, None, :])[:, iu[0], iu[1]]
        c, d, v = codes[sl], draw[sl], valid[sl]
        keep = (v[:, :, None] & v[:, None, :]) & ~((c[:, :, None] == c[:, None, :]) & (d[:, :, None] != d[:, None, :]))
        keep = keep[:, iu[0], iu[1]]
        dx, dy = dx * keep, dy * keep
        den = np.sqrt((dx != 0).sum(1).astype(float) * (dy != 0).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[sl] = np.where(den > 0, (dx * dy).sum(1) / den, np.nan)
    return out


def _spearman_rows_masked(x: np.ndarray, y: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Spearman's rho (average ranks) of each row over its ``valid`` entries; NaN where a side is constant."""
    out = np.empty(len(x))
    for sl in _chunks(len(x), x.shape[1]):
        v = valid[sl]
        cnt = v.sum(1, keepdims=True).astype(float)

        def ranks(a: np.ndarray) -> np.ndarray:
            less = ((a[:, None, :] < a[:, :, None]) & v[:, None, :]).sum(-1)
            equal = ((a[:, None, :] == a[:, :, None]) & v[:, None, :]).sum(-1)
            return np.where(v, less + (equal + 1) / 2.0, 0.0)

        rx, ry = ranks(x[sl]), ranks(y[sl])
        rx = np.where(v, rx - rx.sum(1, keepdims=True) / cnt, 0.0)
        ry = np.where(v, ry - ry.sum(1, keepdims=True) / cnt, 0.0)
        den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[sl] = np.where(den > 1e-12, (rx * ry).sum(1) / den, np.nan)
    return out


def _hit_credit_masked(sig: np.ndarray, ref: np.ndarray, valid: np.ndarray, ks: Sequence[int],
                       ids: Optional[np.ndarray] = None) -> np.ndarray:
    """As :func:`_hit_credit_rows` over each row's ``valid`` entries only; with ``ids``, each run
    counts once however many copies of it the row holds."""
    out = np.empty((len(sig), len(ks)))
    if ids is None:
        ids = np.broadcast_to(np.arange(sig.shape[1]), sig.shape)
    first = _first_copies(ids) & valid
    for sl in _chunks(len(sig), sig.shape[1]):
        s, r, v, f, a = sig[sl], ref[sl], valid[sl], first[sl], ids[sl]
        smax = np.where(v, s, -np.inf).max(1, keepdims=True)
        picks = f & (s == smax)  # the runs with the best signal, each once
        other = a[:, None, :] != a[:, :, None]  # [row, j, l]: l is another run than j
        better = ((r[:, None, :] > r[:, :, None]) & f[:, None, :]).sum(-1)  # distinct runs strictly better than j
        equal = ((r[:, None, :] == r[:, :, None]) & f[:, None, :] & other).sum(-1)  # distinct other runs tied with j
        for i, k in enumerate(ks):
            credit = np.clip((k - better) / (equal + 1.0), 0.0, 1.0)
            out[sl, i] = np.where(picks, credit, 0.0).sum(1) / picks.sum(1)
    return out


def _interval(values: np.ndarray, level: float) -> Optional[List[float]]:
    v = values[np.isfinite(values)]
    if not len(v):
        return None
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise SelectionError(f"Expected `level` to be a float in (0, 1) (e.g. 0.95 for 95 % intervals), but got {level!r}.")
    return float(level)


def _check_count(value: Any, name: str, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SelectionError(f"Expected `{name}` to be an int >= {minimum} ({what}), but got {value!r}.")
    return int(value)


def bootstrap_intervals(
    signal: Sequence[float], reference: Sequence[float], *, mode: str = "max", reference_mode: str = "max",
    ks: Iterable[int] = (), subset_size: Optional[int] = None, n_boot: int = 1000, level: float = 0.95,
    boot_draws: int = 100, seed: int = 0, groups: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
    """Percentile bootstrap intervals over runs (or over groups of runs) for Kendall's tau-b,
    Spearman's rho and the top-k hit rates of picking by ``signal``.

    Each of ``n_boot`` replicates resamples the ``n`` runs with replacement (``idx =
    np.random.default_rng(seed).integers(0, n, size=(n_boot, n))``, one row per replicate) and
    recomputes each statistic on the resampled runs, oriented by ``mode`` and ``reference_mode`` so
    that agreement is positive. A hit rate picks among all the resampled runs (``subset_size`` None
    or ``n``), else averages over ``boot_draws`` random subsets of ``subset_size`` of them, drawn,
    replicate after replicate, by the same Generator as ``np.argsort(rng.random((boot_draws, n)),
    axis=1)[:, :subset_size]``. Ties (which resampling creates) are broken at random in expectation,
    as in :func:`top_k_hits`. The interval is ``np.quantile`` of the replicates at ``(1 - level)/2``
    and ``(1 + level)/2``; replicates where a correlation is undefined (a constant side) are left out
    and counted.

    **Groups** (``groups``: one label per run, e.g. the configuration, whose seeds are not
    independent runs): a cluster bootstrap. Each replicate draws the ``G`` groups with replacement
    (``rng.integers(0, G, size=(n_boot, G))``, the groups numbered in sorted order of their labels'
    strings) and takes every run of each drawn group, so a replicate has as many runs as its drawn
    groups hold. Kendall's tau-b of a replicate leaves out the pairs of runs of one group that come
    from two different draws of it (kept, each within-group pair would count once per pair of
    copies, over-weighting the seed-to-seed pairs and pulling tau toward the within-group
    agreement); Spearman's rho and the hit rates use every run of the replicate; with
    ``subset_size`` the subsets hold ``min(subset_size, runs of the replicate)`` runs.

    What it covers: how much the statistic would vary over other sweeps of ``n`` runs drawn like
    these from the same configurations (with ``groups``: of ``G`` groups drawn like these); not the
    uncertainty of how these runs were scored. Without ``groups``, runs that share a configuration
    are treated as independent and the intervals come out too narrow.

    Args:
        signal: ``(n,)`` the signal of each run.
        reference: ``(n,)`` the reference of each run (e.g. test accuracy).
        mode: ``"max"`` if a higher signal is better, else ``"min"``.
        reference_mode: likewise for the reference.
        ks: the ``k`` of the hit rates, each below the subset size.
        subset_size: runs per subset for the hit rates (default: all).
        n_boot: bootstrap replicates ``B``.
        level: the intervals' level (0.95: 2.5th to 97.5th percentile).
        boot_draws: subsets per replicate when ``subset_size < n``.
        seed: seeds the numpy Generator.
        groups: ``(n,)`` a label per run (any hashable; compared as strings) for a cluster
            bootstrap over the groups, or None (the runs are resampled).

    Returns:
        ``{"kendall_tau": [lo, hi] or None, "spearman_rho": [lo, hi] or None, "top_k": {k: [lo, hi]},
        "undefined": {"kendall_tau": count, "spearman_rho": count}, "n_boot", "level", "seed",
        "resampled": "runs" | "groups", "n_groups"}``.

    Example:
        >>> ci = bootstrap_intervals([0.9, 0.5, 0.7, 0.2], [0.95, 0.6, 0.9, 0.3], ks=[1], n_boot=200)
        >>> ci["kendall_tau"][1], sorted(ci["top_k"])
        (1.0, [1])
        >>> ci = bootstrap_intervals([0.9, 0.8, 0.5, 0.4, 0.2, 0.1], [0.9, 0.95, 0.6, 0.5, 0.3, 0.2],
        ...                          groups=["a", "a", "b", "b", "c", "c"], n_boot=200)
        >>> ci["resampled"], ci["n_groups"]
        ('groups', 3)
    """
    _check_directions(mode, reference_mode)
    sig = np.asarray(signal, dtype=np.float64) * (1 if mode == "max" else -1)
    ref = np.asarray(reference, dtype=np.float64) * (1 if reference_mode == "max" else -1)
    if sig.ndim != 1 or sig.shape != ref.shape or len(sig) < 2:
        raise SelectionError(f"Expected `signal` and `reference` to be 1-D of the same length >= 2, but got shapes {sig.shape} and {ref.shape}.")
    if not (np.isfinite(sig).all() and np.isfinite(ref).all()):
        raise SelectionError("Expected `signal` and `reference` to be finite; drop the runs without a value first.")
    n = len(sig)
    n_boot = _check_count(n_boot, "n_boot", 1, "bootstrap replicates")
    boot_draws = _check_count(boot_draws, "boot_draws", 1, "subsets per replicate")
    level = _check_level(level)
    m = n if subset_size is None else int(subset_size)
    if not 1 <= m <= n:
        raise SelectionError(f"Expected `subset_size` in [1, {n}] (the number of runs), but got {subset_size}.")
    ks = sorted({int(k) for k in ks})
    codes = _group_codes(groups, n)
    rng = np.random.default_rng(seed)
    hits = np.empty((n_boot, len(ks)))
    if codes is None:
        idx = rng.integers(0, n, size=(n_boot, n))
        bs, br = sig[idx], ref[idx]
        taus, rhos = _kendall_rows(bs, br), _spearman_rows(bs, br)
        if ks and m == n:
            hits = _hit_credit_rows(bs, br, ks, idx)
        elif ks:
            for b in range(n_boot):
                sub = np.argsort(rng.random((boot_draws, n)), axis=1)[:, :m]
                hits[b] = _hit_credit_rows(bs[b][sub], br[b][sub], ks, idx[b][sub]).mean(0)
    else:
        idx, draw, valid = _cluster_draws(codes, n_boot, rng)
        bs, br = sig[idx], ref[idx]
        taus = _kendall_rows_grouped(bs, br, codes[idx], draw, valid)
        rhos = _spearman_rows_masked(bs, br, valid)
        if ks and m == n:
            hits = _hit_credit_masked(bs, br, valid, ks, idx)
        elif ks:
            for b in range(n_boot):
                real = idx[b][valid[b]]
                m_b = min(m, len(real))
                sub = np.argsort(rng.random((boot_draws, len(real))), axis=1)[:, :m_b]
                hits[b] = _hit_credit_rows(sig[real][sub], ref[real][sub], ks, real[sub]).mean(0)
    return {
        "kendall_tau": _interval(taus, level), "spearman_rho": _interval(rhos, level),
        "top_k": {k: _interval(hits[:, i], level) for i, k in enumerate(ks)},
        "undefined": {"kendall_tau": int((~np.isfinite(taus)).sum()), "spearman_rho": int((~np.isfinite(rhos)).sum())},
        "n_boot": n_boot, "level": level, "seed": seed,
        "resampled": "runs" if codes is None else "groups", "n_groups": None if codes is None else int(codes.max()) + 1,
    }


def tau_difference(
    signal_a: Sequence[float], signal_b: Sequence[float], reference: Sequence[float], *, mode_a: str = "max",
    mode_b: str = "max", reference_mode: str = "max", n_boot: int = 1000, level: float = 0.95, seed: int = 0,
    groups: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
    """Kendall's tau-b of signal A minus that of signal B (each oriented so that agreement with the
    reference is positive), with a **paired** percentile bootstrap interval: both taus are computed
    on the same resamples (the runs, or with ``groups`` the groups, drawn exactly as
    :func:`bootstrap_intervals` draws them with the same ``seed``: the replicates of each tau are
    those of its own interval over the same runs), and the interval is that of the replicate
    differences. Pass only the runs that have both signals.

    Args:
        signal_a: ``(n,)`` signal A of each run.
        signal_b: ``(n,)`` signal B of each run.
        reference: ``(n,)`` the reference (e.g. test accuracy).
        mode_a: ``"max"`` if a higher A is better, else ``"min"``; likewise ``mode_b``, ``reference_mode``.
        n_boot: bootstrap replicates (0: the point values only).
        level: the interval's level.
        seed: seeds the numpy Generator.
        groups: ``(n,)`` a label per run for a cluster bootstrap (see :func:`bootstrap_intervals`).

    Returns:
        ``{"difference", "interval": [lo, hi] or None, "kendall_tau_a", "kendall_tau_b", "n_runs",
        "undefined": replicates where a tau was undefined (left out), "n_boot", "level", "seed",
        "resampled": "runs" | "groups", "n_groups"}`` (``difference`` None when a tau is undefined).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ref = np.arange(20.0)
        >>> a, b = ref + rng.normal(0, 2, 20), rng.normal(size=20)  # A follows the reference, B is noise
        >>> d = tau_difference(a, b, ref, n_boot=200)
        >>> round(d["difference"], 2), d["interval"][0] > 0
        (0.73, True)
    """
    a = np.asarray(signal_a, dtype=np.float64) * (1 if mode_a == "max" else -1)
    b = np.asarray(signal_b, dtype=np.float64) * (1 if mode_b == "max" else -1)
    ref = np.asarray(reference, dtype=np.float64) * (1 if reference_mode == "max" else -1)
    if a.ndim != 1 or a.shape != b.shape or a.shape != ref.shape or len(a) < 2:
        raise SelectionError(f"Expected `signal_a`, `signal_b` and `reference` to be 1-D of the same length >= 2, but got shapes "
                             f"{a.shape}, {b.shape} and {ref.shape}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all() and np.isfinite(ref).all()):
        raise SelectionError("Expected finite values; pass only the runs that have both signals and the reference.")
    for name, md in (("mode_a", mode_a), ("mode_b", mode_b), ("reference_mode", reference_mode)):
        if md not in ("max", "min"):
            raise SelectionError(f"Expected `{name}` to be 'max' or 'min', but got {md!r}.")
    n = len(a)
    n_boot = _check_count(n_boot, "n_boot", 0, "bootstrap replicates; 0 for none")
    level = _check_level(level)
    codes = _group_codes(groups, n)
    ta, tb = kendall_tau(a, ref), kendall_tau(b, ref)
    out: Dict[str, Any] = {
        "difference": None if np.isnan(ta) or np.isnan(tb) else float(ta - tb),
        "kendall_tau_a": None if np.isnan(ta) else ta, "kendall_tau_b": None if np.isnan(tb) else tb,
        "n_runs": n, "interval": None, "undefined": 0, "n_boot": n_boot, "level": level, "seed": seed,
        "resampled": "runs" if codes is None else "groups", "n_groups": None if codes is None else int(codes.max()) + 1,
    }
    if n_boot == 0:
        return out
    rng = np.random.default_rng(seed)
    if codes is None:
        idx = rng.integers(0, n, size=(n_boot, n))
        diff = _kendall_rows(a[idx], ref[idx]) - _kendall_rows(b[idx], ref[idx])
    else:
        idx, draw, valid = _cluster_draws(codes, n_boot, rng)
        diff = (_kendall_rows_grouped(a[idx], ref[idx], codes[idx], draw, valid)
                - _kendall_rows_grouped(b[idx], ref[idx], codes[idx], draw, valid))
    out["interval"], out["undefined"] = _interval(diff, level), int((~np.isfinite(diff)).sum())
    return out


def cross_validate_choice(
    signals: Mapping[str, Sequence[float]], reference: Sequence[float], *, ks: Iterable[int] = (), n_splits: int = 200,
    level: float = 0.95, seed: int = 0, baselines: Optional[Mapping[str, Sequence[float]]] = None, min_runs: int = 3,
    groups: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
    """How well the signal that looks best on some runs does on the others.

    Choosing the signal with the best Kendall tau on the same runs it is then judged on overfits
    (with many signals, one correlates by chance). Here, ``n_splits`` times: shuffle the ``n`` runs
    (``perm = rng.permutation(n)`` with ``rng = np.random.default_rng([seed, 1])``, split after split),
    take ``perm[:n // 2]`` as the choosing half and the rest as the held-out half; choose the signal
    with the best tau on the choosing half (the first in ``signals``' order on a tie; a signal
    counts on a half where at least ``min_runs`` runs have it), and report its tau and its top-k
    hit on the held-out half (the pick among the held-out runs that have it, ties broken at random in
    expectation; only for ``k`` below their number), beside a random pick's ``k / m``. A split on
    which no signal has a tau is left out. ``baselines`` (e.g. the training loss) are not chosen
    from; their held-out tau on the same halves is reported beside.

    With ``groups`` (a label per run, e.g. the configuration) the *groups* are split instead: ``perm
    = rng.permutation(G)`` over the groups numbered in sorted order of their labels' strings, the
    runs of groups ``perm[:G // 2]`` choose and the runs of the others are held out, so no group has
    runs on both sides (seeds of one configuration on both sides would let the choice see the
    held-out configurations). Needs at least 4 groups.

    Args:
        signals: name -> ``(n,)`` values oriented so that higher is better; NaN = the run lacks it.
        reference: ``(n,)`` reference values, oriented so that higher is better.
        ks: the ``k`` of the held-out hit rates.
        n_splits: random half splits ``R``.
        level: the level of the spread reported over splits (percentiles of the held-out values:
            the halves overlap from split to split, so it is a spread, not a confidence interval).
        seed: seeds the numpy Generator (``default_rng([seed, 1])``).
        baselines: name -> ``(n,)`` oriented values, reported but never chosen.
        min_runs: the fewest runs with a value for a tau on a half.
        groups: ``(n,)`` a label per run: split the groups, not the runs (None: the runs).

    Returns:
        ``{"n_splits", "used", "chosen": {name: count}, "heldout_tau": {"mean", "interval", "n"},
        "heldout_top_k": {k: {"mean", "interval", "n", "random"}}, "baselines": {name: {"mean", "interval", "n"}},
        "level", "seed", "per_split": [(chosen, tau) ...], "split": "runs" | "groups", "n_groups"}``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ref = rng.normal(size=12)
        >>> cv = cross_validate_choice({"good": ref + 0.1 * rng.normal(size=12), "noise": rng.normal(size=12)}, ref, n_splits=50)
        >>> cv["chosen"]["good"] > cv["chosen"]["noise"], cv["heldout_tau"]["mean"] > 0.5
        (True, True)
    """
    names = list(signals)
    if not names:
        raise SelectionError("Expected at least one signal to choose from, but got none.")
    ref = np.asarray(reference, dtype=np.float64)
    vals = [np.asarray(signals[s], dtype=np.float64) for s in names]
    base_names = list(baselines or {})
    base_vals = [np.asarray(baselines[s], dtype=np.float64) for s in base_names]  # type: ignore[index]
    n = len(ref)
    if any(v.shape != (n,) for v in vals + base_vals):
        raise SelectionError(f"Expected every signal to have one value per run ({n}), but got shapes {[v.shape for v in vals + base_vals]}.")
    n_splits = _check_count(n_splits, "n_splits", 1, "random half splits")
    level = _check_level(level)
    if n // 2 < min_runs:
        raise SelectionError(f"Expected at least {2 * min_runs} runs to split in halves of {min_runs} or more, but got {_plural(n, 'run')}.")
    codes = _group_codes(groups, n)
    n_groups = None if codes is None else int(codes.max()) + 1
    if n_groups is not None and n_groups < 4:
        raise SelectionError(f"Expected at least 4 groups to split in halves of 2 or more, but got {_plural(n_groups, 'group')}. "
                             "Group the runs more finely, or split the runs (groups=None).")
    ks = sorted({int(k) for k in ks})
    rng = np.random.default_rng([seed, 1])

    def tau_on(v: np.ndarray, half: np.ndarray) -> float:
        keep = half[np.isfinite(v[half])]
        return kendall_tau(v[keep], ref[keep]) if len(keep) >= min_runs else float("nan")

    chosen: Dict[str, int] = {s: 0 for s in names}
    taus: List[float] = []
    hits: Dict[int, List[float]] = {k: [] for k in ks}
    rand: Dict[int, List[float]] = {k: [] for k in ks}
    base: Dict[str, List[float]] = {s: [] for s in base_names}
    per_split: List[Tuple[Optional[str], float]] = []
    for _ in range(n_splits):
        if codes is None:
            perm = rng.permutation(n)
            a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
        else:
            gperm = rng.permutation(n_groups)
            choose = np.isin(codes, gperm[: n_groups // 2])
            a, b = np.flatnonzero(choose), np.flatnonzero(~choose)
        scores = np.array([tau_on(v, a) for v in vals])
        if not np.isfinite(scores).any():
            per_split.append((None, float("nan")))
            continue
        best = int(np.nanargmax(scores))  # the first of the best
        chosen[names[best]] += 1
        v = vals[best]
        t = tau_on(v, b)
        per_split.append((names[best], t))
        taus.append(t)
        keep = b[np.isfinite(v[b])]
        for k in ks:
            if k < len(keep):
                hits[k].append(float(_hit_credit_rows(v[keep][None], ref[keep][None], [k])[0, 0]))
                rand[k].append(k / len(keep))
        for s, bv in zip(base_names, base_vals):
            base[s].append(tau_on(bv, b))

    def summary(xs: List[float]) -> Dict[str, Any]:
        arr = np.asarray(xs, dtype=np.float64)
        fin = arr[np.isfinite(arr)]
        return {"mean": float(fin.mean()) if len(fin) else None, "interval": _interval(arr, level), "n": int(len(fin))}

    return {
        "n_splits": n_splits, "used": sum(chosen.values()), "chosen": chosen, "heldout_tau": summary(taus),
        "heldout_top_k": {k: {**summary(hits[k]), "random": float(np.mean(rand[k])) if rand[k] else None} for k in ks},
        "baselines": {s: summary(base[s]) for s in base_names}, "level": level, "seed": seed, "per_split": per_split,
        "split": "runs" if codes is None else "groups", "n_groups": n_groups,
    }


# ----------------------------------------------------------------------------- ranking
def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


UNDERFIT_KEY = "netprobe/probe_accuracy"
#: the robust rule's smallest gap below the median (accuracy units), so that a sweep where most runs
#: reach 1.0 (MAD 0) does not flag a run at 0.99
UNDERFIT_MIN_GAP = 0.05
#: the bimodal rule: a run below this fraction of the upper half's median probe accuracy is flagged
UNDERFIT_FRACTION = 0.5


def _underfit(pool: Sequence[Run], at: Union[str, int], underfit_below: Optional[float]) -> Dict[str, Any]:
    """Flag runs whose probe accuracy (at the signal's epoch, else its last value) is far below the
    others': below ``underfit_below`` when given, else below the larger of two thresholds (needs 3
    runs with a value):

    * the outlier rule ``median - max(3 x 1.4826 x MAD, UNDERFIT_MIN_GAP)`` (1.4826 x MAD estimates
      the sd of normal data): one run, or a few, far below a sweep whose runs mostly agree;
    * the bimodal rule ``UNDERFIT_FRACTION x`` the median of the upper half (the runs at or above
      the median): less than half the accuracy of a typical well-fitting run. When many runs stay
      near chance the MAD is so large that the outlier rule's threshold falls below every run (on a
      sweep with a third of its runs near chance it was negative); this one still flags them.

    Half of the way from 0 (the least possible accuracy) to the well-fitting runs' level: the
    number of classes is not in the logs, so chance is not used; with 10 classes a run at chance
    (0.1) is flagged whenever the upper half's median is above 0.2."""
    vals: Dict[str, Optional[float]] = {}
    for r in pool:
        v, _ = _value_at(r, UNDERFIT_KEY, at if isinstance(at, int) else "last", "max")
        vals[r.name] = float(v) if v is not None and math.isfinite(v) else None
    fin = np.array([v for v in vals.values() if v is not None], dtype=np.float64)
    thr: Optional[float] = None
    if underfit_below is not None:
        thr, rule = float(underfit_below), f"{UNDERFIT_KEY} < {float(underfit_below):g} (underfit_below)"
    elif len(fin) >= 3:
        med = float(np.median(fin))
        mad = float(np.median(np.abs(fin - med)))
        outlier = med - max(3 * 1.4826 * mad, UNDERFIT_MIN_GAP)
        upper = float(np.median(fin[fin >= med]))
        bimodal = UNDERFIT_FRACTION * upper
        thr = max(outlier, bimodal)
        rule = (f"{UNDERFIT_KEY} < {thr:.4g}, the larger of median {med:.4g} - max(3 x 1.4826 x MAD {mad:.3g}, "
                f"{UNDERFIT_MIN_GAP:g}) = {outlier:.4g} and {UNDERFIT_FRACTION:g} x the upper half's median {upper:.4g} "
                f"= {bimodal:.4g}")
    elif len(fin):
        rule = f"not checked: {_plural(len(fin), 'run')} logged {UNDERFIT_KEY} (the robust rule needs 3; pass underfit_below)"
    else:
        rule = f"not checked: no run logged {UNDERFIT_KEY}"
    flagged = [n for n, v in vals.items() if thr is not None and v is not None and v < thr]
    return {"key": UNDERFIT_KEY, "threshold": thr, "rule": rule, "runs": flagged, "values": vals}


def group_labels(runs: Sequence[Run], *, group: Optional[str] = None, group_by: Union[str, Sequence[str]] = ()) -> Dict[str, str]:
    """Each run's group (run name -> label) for a grouped bootstrap and cross-validation.

    ``group``: a regular expression searched (``re.search``) in each run's name; its first capture
    group names the run's group, or the whole match when it has none (``r"^(c\\d+)_"`` puts
    ``c03_lr0.01_s0`` and ``c03_lr0.01_s1`` in group ``c03``). ``group_by``: hyperparameter names
    (from the runs' ``hparams``); runs with equal values of all of them form a group. Both together:
    runs sharing both. A run the regex does not match, or without one of the hyperparameters, is
    refused (``SelectionError``, naming it): a run left out of the grouping would be counted as a
    group of its own, which is the mistake grouping is there to avoid.

    Example:
        >>> runs = [Run(n, "", hparams={"lr": lr}) for n, lr in [("c0_s0", 0.1), ("c0_s1", 0.1), ("c1_s0", 0.2)]]
        >>> group_labels(runs, group=r"^(c\\d+)_")
        {'c0_s0': 'c0', 'c0_s1': 'c0', 'c1_s0': 'c1'}
        >>> group_labels(runs, group_by="lr")
        {'c0_s0': 'lr=0.1', 'c0_s1': 'lr=0.1', 'c1_s0': 'lr=0.2'}
    """
    by = [b for part in ([group_by] if isinstance(group_by, str) else list(group_by)) for b in str(part).split(",") if b.strip()]
    by = [b.strip() for b in by]
    if group is None and not by:
        raise SelectionError("Expected `group` (a regex on the run names) or `group_by` (hyperparameter names), but got neither.")
    labels: Dict[str, List[str]] = {r.name: [] for r in runs}
    if group is not None:
        if not isinstance(group, str) or not group:
            raise SelectionError(f"Expected `group` to be a regular expression (a non-empty str such as '^(c\\d+)_'), but got {group!r}.")
        try:
            pattern = re.compile(group)
        except re.error as err:
            raise SelectionError(f"Expected `group` to be a regular expression, but got {group!r}: {err}. "
                                 "Quote it in the shell, e.g. --group '^(c\\d+)_'.") from None
        missed = []
        for r in runs:
            m = pattern.search(r.name)
            label = None if m is None else (m.group(1) if pattern.groups else m.group(0))
            if not label:
                missed.append(r.name)
            else:
                labels[r.name].append(label)
        examples = ", ".join(repr(r.name) for r in runs[:3])
        if missed and len(missed) == len(runs):
            raise SelectionError(
                f"The group regex {group!r} matches no run name (runs are named like {examples}). Write a pattern "
                "that re.search finds in every run's name, whose first capture group names its configuration "
                "(e.g. '^(c\\d+)_' or '(.*)_s\\d+$'), or group by hyperparameters with --group-by / group_by."
            )
        if missed:
            raise SelectionError(
                f"The group regex {group!r} matches {len(runs) - len(missed)} of {_plural(len(runs), 'run')} but not "
                f"{', '.join(repr(n) for n in missed[:5])}{' ...' if len(missed) > 5 else ''} ({len(missed)} in all). Every run "
                "needs a group (a run left out would count as a group of its own): widen the pattern, or drop those runs with --where."
            )
    for key in by:
        missing = [r.name for r in runs if key not in r.hparams]
        if len(missing) == len(runs):
            known = sorted({k for r in runs for k in r.hparams})
            raise SelectionError(
                f"No run has the hyperparameter {key!r} to group by. Closest: {close_names(key, known)} "
                f"({len(known)} hyperparameters logged; they come from the HParams plugin and hparams.yaml)."
            )
        if missing:
            raise SelectionError(
                f"Expected every run to have the hyperparameter {key!r} to group by, but "
                f"{', '.join(repr(n) for n in missing[:5])}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all) "
                "lack it. Group by a regex on the run names (--group / group) instead, or drop those runs."
            )
        for r in runs:
            labels[r.name].append(f"{key}={r.hparams[key]}")
    return {name: ",".join(parts) for name, parts in labels.items()}


def _grouping(runs: Sequence[Run], group: Optional[str], group_by: Union[str, Sequence[str]]) -> Tuple[Optional[Dict[str, str]], Optional[Dict[str, Any]]]:
    """``(run name -> label, a description)`` or ``(None, None)`` when no grouping was asked for."""
    by = [group_by] if isinstance(group_by, str) else list(group_by or ())
    if group is None and not by:
        return None, None
    labels = group_labels(runs, group=group, group_by=by)
    sizes: Dict[str, int] = {}
    for g in labels.values():
        sizes[g] = sizes.get(g, 0) + 1
    if len(sizes) < 2 and len(runs) >= 2:
        raise SelectionError(
            f"Expected the grouping to form at least 2 groups, but all {_plural(len(runs), 'run')} fall in one "
            f"({next(iter(sizes))!r}): there is nothing to resample. Check the regex's capture group or the hyperparameters."
        )
    counts = sorted(sizes.values())
    return labels, {"regex": group, "by": [b.strip() for part in by for b in str(part).split(",") if b.strip()],
                    "n_groups": len(sizes), "sizes": sizes, "runs_per_group": [counts[0], counts[-1]] if counts else None}


def _check_common(mode: str, against_mode: str, at: Any, where: Union[str, Sequence[str]], underfit_below: Any) -> List[Tuple[str, str, float]]:
    if mode not in ("max", "min") or against_mode not in ("max", "min"):
        raise SelectionError(f"Expected `mode` and `against_mode` to be 'max' or 'min', but got {mode!r}, {against_mode!r}.")
    if not (at in ("last", "best") or (isinstance(at, int) and not isinstance(at, bool) and at >= 0)):
        raise SelectionError(f"Expected `at` to be 'last', 'best' or an epoch number >= 0, but got {at!r}.")
    if underfit_below is not None and (isinstance(underfit_below, bool) or not isinstance(underfit_below, (int, float))
                                       or not math.isfinite(underfit_below)):
        raise SelectionError(f"Expected `underfit_below` to be a finite number (a probe accuracy such as 0.9) or None, but got {underfit_below!r}.")
    if isinstance(where, str):
        where = [where]
    return [parse_condition(c) for c in where]


def _load_readable(logdir: Union[str, os.PathLike]) -> Tuple[List[Run], List[Dict[str, Any]], List[str]]:
    loaded = load_runs(logdir)
    bad = [{"run": r.name, "path": r.path, "reason": r.error} for r in loaded if r.error]
    runs = [r for r in loaded if not r.error]
    all_tags = sorted({t for r in runs for t in r.scalars})
    if not all_tags:
        found = "; ".join(f"{b['run']}: {b['reason']}" for b in bad[:5]) + (f"; ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise SelectionError(
            f"No readable event data was found under {os.fspath(logdir)!r}: its event files "
            f"(events.out.tfevents.*) hold no scalars" + (f" that can be read ({found})" if bad else "")
            + ". Point LOGDIR at the TensorBoard logs of the sweep, written by SummaryWriter or Lightning's TensorBoardLogger."
        )
    return runs, bad, all_tags


def _require_key(key: str, runs: Sequence[Run], all_tags: Sequence[str]) -> None:
    """SelectionError unless some run logged ``key`` (an ``@`` alias: its metric's per-layer keys)."""
    if "@" in key:
        base, _, layer = key.partition("@")
        if layer == "deepest":
            if not any(t.startswith(base + "/") for t in all_tags):
                raise SelectionError(
                    f"No run logged a per-layer key {base}/<layer> for {key!r}. Closest keys: "
                    f"{close_names(base, all_tags)}. ({len(all_tags)} keys exist.)"
                )
            return
        key = f"{base}/{layer}"
    if not any(key in r.scalars for r in runs):
        raise SelectionError(
            f"No run logged {key!r}. Closest keys: {close_names(key, all_tags)}. "
            f"({len(all_tags)} keys exist; netprobe keys start with 'netprobe/'.)"
        )


def _fails_conditions(r: Run, conds: Sequence[Tuple[str, str, float]], at: Union[str, int]) -> Optional[str]:
    """Why ``r`` fails a condition (read at ``at``'s epoch, else at its last value), or None. With
    ``at="best"`` conditions are checked per measurement instead (:func:`_best_where`)."""
    for key, op, val in ([] if at == "best" else conds):
        v = _condition_value(r, key, at if isinstance(at, int) else None)
        if not _holds(v, op, val):
            why_c = _value_at(r, key, at if isinstance(at, int) else "last", "max")[1] if v is None else None
            return why_c or (f"no {key!r}" if v is None else f"{key}={v:.4g} fails {op} {val:g}")
    return None


def _signal_value(r: Run, key: str, mode: str, at: Union[str, int], conds: Sequence[Tuple[str, str, float]]) -> Tuple[Optional[float], Optional[str]]:
    v, why = _best_where(r, key, mode, conds) if at == "best" and conds else _value_at(r, key, at, mode)
    if v is None or not math.isfinite(v):
        return None, why or "non-finite signal"
    return float(v), None


def _resolve_ks(top_k: Optional[Sequence[int]], sizes: Mapping[str, Tuple[int, int]], subset_given: bool) -> List[int]:
    """The ``k`` of the hit rates: each below every subset size; ``sizes``: name -> (runs, subset size)."""
    if not sizes:
        return []
    name, (n, m) = min(sizes.items(), key=lambda kv: (kv[1][1], kv[0]))
    if top_k is None:
        return [k for k in (1, 5, 10) if k < m]
    ks = sorted({int(k) for k in top_k})
    if ks and ks[0] < 1:
        raise SelectionError(f"Expected every top-k to be a positive integer, but got k={ks[0]}.")
    too_big = [k for k in ks if k >= m]
    if too_big:
        of = f" ({name})" if len(sizes) > 1 else ""
        raise SelectionError(
            f"Expected every top-k below the subset size {m} ({_plural(n, 'run')} ranked{of}"
            f"{f', --subset-size {m}' if subset_given else ''}), but got k={too_big[0]}: every pick "
            f"is among the top {m} of {m}, so its hit rate is 1 whatever the signal. Use k < {m}."
        )
    return ks


def _statistics(sigs: Sequence[float], refs: Sequence[float], *, mode: str, against_mode: str, ks: Sequence[int], m: int,
                n_draws: int, seed: int, n_boot: int, level: float, boot_draws: int,
                boot_order: Optional[Sequence[int]] = None, groups: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """tau, rho (oriented: agreement positive), hit rates, their random baseline k/m and bootstrap
    intervals; the bootstrap resamples the runs in ``boot_order`` (by run name), so that the same
    runs get the same resamples whichever function ranks them."""
    osig = np.asarray(sigs, dtype=np.float64) * (1 if mode == "max" else -1)
    oref = np.asarray(refs, dtype=np.float64) * (1 if against_mode == "max" else -1)
    rho, tau = spearman_rho(osig, oref), kendall_tau(osig, oref)  # NaN when a side is constant
    out: Dict[str, Any] = {
        "spearman_rho": None if np.isnan(rho) else rho, "kendall_tau": None if np.isnan(tau) else tau,
        "subset_size": m, "n_draws": 1 if m == len(osig) else n_draws,
        "top_k": {str(k): p for k, p in top_k_hits(sigs, refs, ks, mode=mode, reference_mode=against_mode, subset_size=m,
                                                      n_draws=n_draws, seed=seed).items()} if ks else {},
        "top_k_random": {str(k): k / m for k in ks},
        "spearman_rho_ci": None, "kendall_tau_ci": None, "top_k_ci": {},
    }
    if groups is not None and len(set(groups)) < 2:
        out["bootstrap_undefined"] = {"reason": "its runs are all in one group: nothing to resample"}
    elif n_boot > 0:
        order = np.arange(len(osig)) if boot_order is None else np.asarray(boot_order)
        ci = bootstrap_intervals(np.asarray(sigs, dtype=np.float64)[order], np.asarray(refs, dtype=np.float64)[order], mode=mode, reference_mode=against_mode, ks=ks, subset_size=m, n_boot=n_boot,
                                 level=level, boot_draws=boot_draws, seed=seed,
                                 groups=None if groups is None else [groups[i] for i in order])
        out["spearman_rho_ci"], out["kendall_tau_ci"] = ci["spearman_rho"], ci["kendall_tau"]
        out["top_k_ci"] = {str(k): v for k, v in ci["top_k"].items()}
        out["bootstrap_undefined"] = ci["undefined"]
    return out


def _bootstrap_doc(n_boot: int, level: float, seed: int, boot_draws: int,
                   grouping: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    if n_boot <= 0:
        return None
    if grouping is None:
        return {"n_boot": n_boot, "level": level, "seed": seed, "boot_draws": boot_draws, "interval": "percentile",
                "resampled": "runs",
                "covers": "the spread of each statistic over sweeps like this one (the runs resampled with replacement)"}
    return {"n_boot": n_boot, "level": level, "seed": seed, "boot_draws": boot_draws, "interval": "percentile",
            "resampled": "groups", "n_groups": grouping["n_groups"],
            "covers": "the spread of each statistic over sweeps like this one (the groups resampled with replacement, "
                      "each with all its runs: a cluster bootstrap)"}


def rank_runs(
    logdir: Union[str, os.PathLike],
    metric: str,
    *,
    mode: str = "max",
    at: Union[str, int] = "last",
    against: Optional[str] = None,
    against_mode: str = "max",
    top_k: Optional[Sequence[int]] = None,
    subset_size: Optional[int] = None,
    n_draws: int = 10_000,
    seed: int = 0,
    where: Sequence[str] = (),
    layer: Optional[str] = None,
    n_boot: int = 1000,
    level: float = 0.95,
    boot_draws: int = 100,
    underfit_below: Optional[float] = None,
    group: Optional[str] = None,
    group_by: Union[str, Sequence[str]] = (),
) -> Dict[str, Any]:
    """Rank the runs under ``logdir`` by ``metric``; see the module docstring.

    ``metric`` may be a layer alias: ``"netprobe/<metric>@deepest"`` takes, per run, the deepest
    monitored layer's ``netprobe/<metric>/<layer>`` (see :func:`layer_order` for how "deepest" is
    known; a run whose logs do not tell is skipped, with the reason), ``"netprobe/<metric>@<layer>"``
    that layer's key. ``layer="deepest"`` (or a layer name) is the same as writing ``@layer``.

    ``where``: conditions such as ``"netprobe/probe_accuracy>=0.99"``; runs failing one are skipped.

    ``top_k``: the ``k`` of the hit rates; each must be below the subset size (the number of runs
    ranked, by default), since any pick is in the top ``k >= subset size``: ``SelectionError``
    otherwise. The default, ``None``, takes those of 1, 5, 10 below it. Beside each hit rate,
    ``top_k_random`` holds a random pick's ``k / m``.

    ``spearman_rho`` and ``kendall_tau`` are oriented by ``mode`` and ``against_mode``: positive
    when the runs the signal prefers are those the reference prefers (1 = the same order), whatever
    the modes. A run whose event file has a corrupt or truncated record is skipped, with the reason.

    ``n_boot`` (0: none), ``level``, ``boot_draws``: percentile bootstrap intervals over runs for
    rho, tau and the hit rates (:func:`bootstrap_intervals`, seeded with ``seed``, over the runs sorted by name).
    ``group`` (a regex on the run names) and/or ``group_by`` (hyperparameter names): see
    :func:`group_labels`; the bootstrap then resamples the groups (a cluster bootstrap: the seeds of
    one configuration are not independent runs, and resampling them as if they were gives intervals
    too narrow). ``bootstrap["resampled"]`` says which; ``grouping`` describes the groups and each
    run has its ``group``.

    Runs whose ``netprobe/probe_accuracy`` is far below the others' are flagged, not dropped: below
    ``underfit_below`` when given, else below the median minus ``max(3 x 1.4826 x MAD, 0.05)``
    (read at the signal's epoch with an epoch ``at``, else at its last value).

    Returns:
        ``{"metric", "mode", "at", "against", "where", "runs": [...], "skipped": [...], "spearman_rho",
        "kendall_tau", "spearman_rho_ci", "kendall_tau_ci", "pick", "pick_ties", "pick_reference_rank",
        "top_k", "top_k_ci", "top_k_random", "subset_size", "n_draws", "bootstrap", "underfit", "layer_source",
        "grouping"}``
        (``pick_ties``: the runs tied for the best signal, ``pick`` the first by name; with a tie,
        ``pick_reference_rank`` is their mean reference rank; ``underfit``: ``{"key", "threshold",
        "rule", "runs", "values"}``); each run is ``{"rank", "run", "path", "hparams", "signal",
        "reference", "reference_rank", "key", "underfit", "group"}`` (best first; ``key``: the key read;
        ``group``: its group label, or None without grouping).
    """
    conds = _check_common(mode, against_mode, at, where, underfit_below)
    n_boot = _check_count(n_boot, "n_boot", 0, "bootstrap replicates; 0 for none")
    level = _check_level(level)
    if layer is not None:
        if "@" in metric or (_netprobe_parts(metric) or ("", None))[1] is not None:
            raise SelectionError(f"Expected `layer` only with a metric without a layer (e.g. 'netprobe/reliance_auc'), but got {metric!r}.")
        metric = f"{metric}@{layer}"
    metric, _ = parse_signal(metric) if "@" in metric else (metric, None)
    runs, bad, all_tags = _load_readable(logdir)
    for key in [metric] + ([against] if against else []) + [k for k, _, _ in conds]:
        _require_key(key, runs, all_tags)
    rows, skipped, sources = [], list(bad), set()
    for r in runs:
        failed = _fails_conditions(r, conds, at)
        key, why_key, source = _resolve_key(r, metric)
        if failed or key is None:
            skipped.append({"run": r.name, "path": r.path, "reason": failed or why_key})
            continue
        sig, why = _signal_value(r, key, mode, at, conds)
        ref, why_ref = (_value_at(r, against, "last", against_mode) if against else (None, None))
        if sig is None:
            skipped.append({"run": r.name, "path": r.path, "reason": why})
            continue
        if against and (ref is None or not np.isfinite(ref)):
            skipped.append({"run": r.name, "path": r.path, "reason": why_ref or "non-finite reference"})
            continue
        if source:
            sources.add(source)
        rows.append({"run": r.name, "path": r.path, "hparams": dict(r.hparams), "signal": float(sig),
                     "reference": None if ref is None else float(ref), "key": key})
    ranked = [r for r in runs if r.name in {d["run"] for d in rows}]
    underfit = _underfit(ranked, at, underfit_below)
    labels, grouping = _grouping(ranked, group, group_by) if ranked else (None, None)
    for d in rows:
        d["underfit"] = d["run"] in underfit["runs"]
        d["group"] = None if labels is None else labels[d["run"]]
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda d: (sign * d["signal"], d["run"]))
    for i, d in enumerate(rows, 1):
        d["rank"] = i
    out: Dict[str, Any] = {"metric": metric, "mode": mode, "at": at, "against": against, "where": list(where) if not isinstance(where, str) else [where],
                           "runs": rows, "skipped": skipped,
                           "spearman_rho": None, "kendall_tau": None, "spearman_rho_ci": None, "kendall_tau_ci": None,
                           "pick": rows[0]["run"] if rows else None,
                           "pick_ties": [d["run"] for d in rows if rows and d["signal"] == rows[0]["signal"]],
                           "pick_reference_rank": None, "top_k": {}, "top_k_ci": {}, "top_k_random": {},
                           "subset_size": None, "n_draws": None, "bootstrap": None, "underfit": underfit,
                           "layer_source": sorted(sources), "grouping": grouping}
    if against and rows:
        refs = np.array([d["reference"] for d in rows])
        rsign = -1 if against_mode == "max" else 1
        ref_order = _rankdata(rsign * refs)  # 1 = best reference (ties: average)
        for d, rr in zip(rows, ref_order):
            d["reference_rank"] = float(rr)
        tied = len(out["pick_ties"])  # a tie for the best signal: the expected rank of a random pick among them
        out["pick_reference_rank"] = float(np.mean(ref_order[:tied]))
        if len(rows) >= 2:
            m = subset_size if subset_size is not None else len(rows)
            if not 1 <= m <= len(rows):
                raise SelectionError(
                    f"Expected `subset_size` in [1, {len(rows)}] (the number of runs ranked), but got {subset_size}."
                )
            ks = _resolve_ks(top_k, {metric: (len(rows), m)}, subset_size is not None)
            out.update(_statistics([d["signal"] for d in rows], refs, mode=mode, against_mode=against_mode, ks=ks, m=m,
                                   n_draws=n_draws, seed=seed, n_boot=n_boot, level=level, boot_draws=boot_draws,
                                   boot_order=sorted(range(len(rows)), key=lambda i: rows[i]["run"]),
                                   groups=None if labels is None else [d["group"] for d in rows]))
            out["bootstrap"] = _bootstrap_doc(n_boot, level, seed, boot_draws, grouping)
    return out


def _expand_signals(specs: Sequence[str], runs: Sequence[Run], all_tags: Sequence[str], exclude: Sequence[str],
                    kind: str) -> Tuple[List[Tuple[str, str, str]], List[Dict[str, str]]]:
    """Signal specs -> ``[(key, direction, kind)]`` and ``[{"signal", "reason"}]`` left out."""
    netprobe = [t for t in all_tags if (_netprobe_parts(t) or ("time", None))[0] not in _NOT_SIGNALS and t not in exclude]
    per_layer = sorted({f"netprobe/{p[0]}@deepest" for p in map(_netprobe_parts, netprobe) if p and p[1] is not None})
    candidates = sorted(set(netprobe) | set(per_layer))
    others = sorted((set(all_tags) - set(netprobe) - set(exclude) - {"epoch"}))
    out: List[Tuple[str, str, str]] = []
    left_out: List[Dict[str, str]] = []
    for spec in specs:
        key, direction = parse_signal(spec)
        if key == "all":
            matches, explicit = candidates, False
        elif _GLOB_CHARS & set(key):
            matches = [t for t in sorted(set(candidates) | set(others)) if fnmatch.fnmatchcase(t, key)]
            explicit = False
            if not matches:
                raise SelectionError(
                    f"The {kind} pattern {key!r} matches no key any run logged. Closest keys: "
                    f"{close_names(key.replace('*', ''), all_tags)}. Write 'all' for every netprobe key."
                )
        else:
            _require_key(key, runs, all_tags)
            matches, explicit = [key], True
        for match in matches:
            d = direction or key_direction(match)
            if d is None:
                if explicit:
                    raise SelectionError(
                        f"Expected a direction for {match!r}: netprobe does not know whether a higher value is better. "
                        f"Write '{match}:max' (higher is better) or '{match}:min' (lower is better)."
                    )
                left_out.append({"signal": match, "reason": "direction unknown (name it KEY:min or KEY:max)"})
                continue
            out.append((match, d, kind))
    return out, left_out


def rank_signals(
    logdir: Union[str, os.PathLike],
    against: str,
    *,
    signals: Union[str, Sequence[str]] = ("all",),
    baselines: Union[str, Sequence[str]] = (),
    against_mode: str = "max",
    at: Union[str, int] = "last",
    where: Union[str, Sequence[str]] = (),
    top_k: Optional[Sequence[int]] = None,
    subset_size: Optional[int] = None,
    n_draws: int = 10_000,
    n_boot: int = 1000,
    level: float = 0.95,
    boot_draws: int = 100,
    cv: int = 200,
    seed: int = 0,
    underfit_below: Optional[float] = None,
    group: Optional[str] = None,
    group_by: Union[str, Sequence[str]] = (),
    compare: Sequence[Union[str, Sequence[str]]] = (),
) -> Dict[str, Any]:
    """How well each logged signal ranks the runs under ``logdir`` by the reference ``against``:
    one row per signal, with intervals, random baselines and a cross-validated choice.

    Signals (``signals``; ``baselines`` take the same forms and are rows of their own, never chosen
    by the cross-validation):

    * ``"all"``: every ``netprobe/<metric>`` and ``netprobe/<metric>/<layer>`` key the runs logged,
      and ``netprobe/<metric>@deepest`` for each metric logged per layer (not the monitors'
      ``netprobe/time/*``);
    * a glob pattern (``"netprobe/reliance_*"``; ``*`` crosses ``/``), an exact key, or a layer
      alias ``netprobe/<metric>@deepest`` / ``@<layer>`` (see :func:`rank_runs`);
    * each optionally ``KEY:min`` / ``KEY:max``, the key's direction. Without it the direction of a
      netprobe key comes from :func:`key_direction`; an exact key whose direction is unknown is
      refused (``SelectionError``), and pattern matches without one are listed in ``not_evaluated``.

    Runs: those meeting ``where`` with a finite reference (its last value), sorted by name; each
    signal is evaluated on those that have it (``at`` as in :func:`rank_runs`; the others are listed
    in that row's ``missing``). Per signal: Kendall's tau-b and Spearman's rho oriented so that
    agreement is positive whatever ``against_mode`` and the signal's direction; the pick (the best
    run by the signal; ties broken at random in expectation) and its reference rank; top-k hit
    rates (:func:`top_k_hits`) beside a random pick's ``k / m``; and percentile bootstrap intervals
    for all of them (:func:`bootstrap_intervals`; each signal's Generator seeded with ``seed``, so
    signals over the same runs share their resamples). Every ``k`` must be below every signal's
    subset size (default: its number of runs): ``SelectionError`` otherwise.

    ``cv`` (0: off) random half splits give the cross-validated choice
    (:func:`cross_validate_choice`) among the signals with at least 3 runs, over all the runs
    (needs 6). ``underfit_below``: see :func:`rank_runs` (runs are flagged, never dropped).

    ``group`` (a regex on the run names) and/or ``group_by`` (hyperparameter names; see
    :func:`group_labels`): the bootstrap resamples groups (a cluster bootstrap) and the
    cross-validation splits groups (no group on both sides): for a sweep with several seeds per
    configuration, whose seeds are not independent runs. ``bootstrap["resampled"]`` and
    ``cv["split"]`` say which was used.

    ``compare``: pairs of signals (``"A,B"`` or ``("A", "B")``, each a row's signal, a baseline
    included): Kendall's tau of A minus that of B over the runs that have both, with a paired
    bootstrap interval (:func:`tau_difference`: the same resamples for both; grouped when
    ``group``/``group_by`` is given).

    Returns:
        ``{"against", "against_mode", "at", "where", "runs": [{"run", "path", "hparams", "reference",
        "probe_accuracy", "underfit", "group"}], "skipped", "signals": [row], "not_evaluated", "ks", "bootstrap",
        "cv", "underfit", "grouping", "compare"}``; each row ``{"signal", "kind", "mode", "n_runs", "kendall_tau",
        "kendall_tau_ci", "spearman_rho", "spearman_rho_ci", "pick", "pick_ties", "pick_reference_rank",
        "top_k", "top_k_ci", "top_k_random", "subset_size", "n_draws", "missing", "keys", "layer_source",
        "values"}`` (``keys``: run -> the key read, for a layer alias; ``values``: run -> the signal's
        value as logged, not oriented, for the runs that have it); each ``compare`` entry as
        :func:`tau_difference` returns, with ``"a"``, ``"b"`` and ``"runs"`` (the runs compared).

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> d = tempfile.mkdtemp()
        >>> for i, acc in enumerate([0.7, 0.8, 0.9, 0.6]):
        ...     with SummaryWriter(f"{d}/run{i}") as w:
        ...         w.add_scalar("netprobe/reliance_auc", acc + 0.01, 1); w.add_scalar("train/loss", 1 - acc, 1)
        ...         w.add_scalar("test/acc", acc, 1)
        >>> res = rank_signals(d, "test/acc", baselines=["train/loss:min"], n_boot=100, cv=0)
        >>> for row in res["signals"]:
        ...     print(row["signal"], row["kendall_tau"])
        netprobe/reliance_auc 1.0
        train/loss 1.0
    """
    conds = _check_common("max", against_mode, at, where, underfit_below)
    n_boot = _check_count(n_boot, "n_boot", 0, "bootstrap replicates; 0 for none")
    cv = _check_count(cv, "cv", 0, "random half splits; 0 for none")
    level = _check_level(level)
    if not against:
        raise SelectionError("Expected `against`, the reference key (e.g. 'test/acc'), to judge the signals by, but got none.")
    signals = [signals] if isinstance(signals, str) else list(signals)
    baselines = [baselines] if isinstance(baselines, str) else list(baselines)
    pairs = _parse_compare(compare)
    if not signals and not baselines:
        raise SelectionError("Expected at least one signal or baseline, but got none. Pass signals=['all'] for every netprobe key.")
    runs, bad, all_tags = _load_readable(logdir)
    for key in [against] + [k for k, _, _ in conds]:
        _require_key(key, runs, all_tags)
    pool, skipped = [], list(bad)
    for r in runs:
        failed = _fails_conditions(r, conds, at)
        ref, why_ref = _value_at(r, against, "last", against_mode)
        if failed is None and (ref is None or not math.isfinite(ref)):
            failed = why_ref or "non-finite reference"
        if failed:
            skipped.append({"run": r.name, "path": r.path, "reason": failed})
        else:
            pool.append((r, float(ref)))  # type: ignore[arg-type]
    pool.sort(key=lambda p: p[0].name)
    if len(pool) < 2:
        raise SelectionError(
            f"Expected at least 2 runs with {against!r} to judge signals on, but got {_plural(len(pool), 'run')}"
            + (" (" + "; ".join(f"{s['run']}: {s['reason']}" for s in skipped[:5]) + ")" if skipped else "") + "."
        )
    labels, grouping = _grouping([r for r, _ in pool], group, group_by)
    base_rows, base_left = _expand_signals(baselines, runs, all_tags, [against], "baseline")
    sig_rows, left_out = _expand_signals(signals, runs, all_tags, [against], "signal")
    chosen: Dict[str, Tuple[str, str]] = {}
    for key, d, kind in sig_rows:
        chosen.setdefault(key, (d, kind))  # the first spec naming a key gives its direction
    for key, d, kind in base_rows:
        chosen[key] = (d, kind)  # a key named as a baseline is a baseline
    order = list(dict.fromkeys([k for k, _, _ in sig_rows if chosen[k][1] == "signal"] + [k for k, _, _ in base_rows]))
    names = [r.name for r, _ in pool]
    refs_all = np.array([ref for _, ref in pool])
    rows: List[Dict[str, Any]] = []
    for key in order:
        direction, kind = chosen[key]
        vals, missing, keys, sources = np.full(len(pool), np.nan), [], {}, set()
        for i, (r, _) in enumerate(pool):
            rkey, why, source = _resolve_key(r, key)
            v, why_v = _signal_value(r, rkey, direction, at, conds) if rkey else (None, why)
            if v is None:
                missing.append({"run": r.name, "reason": why_v})
                continue
            vals[i] = v
            if rkey != key:
                keys[r.name] = rkey
            if source:
                sources.add(source)
        rows.append({"signal": key, "kind": kind, "mode": direction, "n_runs": int(np.isfinite(vals).sum()), "missing": missing,
                     "keys": keys, "layer_source": sorted(sources), "_values": vals,
                     "values": {names[i]: float(vals[i]) for i in range(len(pool)) if np.isfinite(vals[i])}})
    sizes = {}
    for row in rows:
        n_s = row["n_runs"]
        if n_s >= 2:
            m = n_s if subset_size is None else int(subset_size)
            if not 1 <= m <= n_s:
                raise SelectionError(f"Expected `subset_size` in [1, {n_s}] (the runs {row['signal']} ranks), but got {subset_size}.")
            sizes[row["signal"]] = (n_s, m)
    ks = _resolve_ks(top_k, sizes, subset_size is not None)
    for row in rows:
        vals = row.pop("_values")
        have = np.isfinite(vals)
        row.update({"kendall_tau": None, "spearman_rho": None, "kendall_tau_ci": None, "spearman_rho_ci": None, "pick": None,
                    "pick_ties": [], "pick_reference_rank": None, "top_k": {}, "top_k_ci": {}, "top_k_random": {},
                    "subset_size": None, "n_draws": None})
        row["_oriented"] = np.where(have, vals * (1 if row["mode"] == "max" else -1), np.nan)
        if row["signal"] not in sizes:
            continue
        sig, ref = vals[have], refs_all[have]
        run_names = [n for n, h in zip(names, have) if h]
        osig = sig * (1 if row["mode"] == "max" else -1)
        ties = [run_names[i] for i in np.flatnonzero(osig == osig.max())]
        ref_rank = _rankdata((-1 if against_mode == "max" else 1) * ref)
        row.update({"pick": ties[0], "pick_ties": ties, "pick_reference_rank": float(np.mean(ref_rank[osig == osig.max()]))})
        row.update(_statistics(sig, ref, mode=row["mode"], against_mode=against_mode, ks=ks, m=sizes[row["signal"]][1],
                               n_draws=n_draws, seed=seed, n_boot=n_boot, level=level, boot_draws=boot_draws,
                               groups=None if labels is None else [labels[n] for n in run_names]))
    underfit = _underfit([r for r, _ in pool], at, underfit_below)
    out_runs = [{"run": r.name, "path": r.path, "hparams": dict(r.hparams), "reference": ref,
                 "probe_accuracy": underfit["values"].get(r.name), "underfit": r.name in underfit["runs"],
                 "group": None if labels is None else labels[r.name]} for r, ref in pool]
    cv_doc: Optional[Dict[str, Any]] = None
    if cv > 0:
        oref = refs_all * (1 if against_mode == "max" else -1)
        cands = {row["signal"]: row["_oriented"] for row in rows if row["kind"] == "signal" and row["n_runs"] >= 3}
        bases = {row["signal"]: row["_oriented"] for row in rows if row["kind"] == "baseline" and row["n_runs"] >= 3}
        if not cands:
            cands, bases = bases, {}
        if len(pool) < 6:
            cv_doc = {"skipped": f"needs at least 6 runs (halves of 3 or more), got {_plural(len(pool), 'run')}"}
        elif grouping is not None and grouping["n_groups"] < 4:
            cv_doc = {"skipped": f"needs at least 4 groups (halves of 2 or more), got {_plural(grouping['n_groups'], 'group')}"}
        elif not cands:
            cv_doc = {"skipped": "no signal has 3 runs"}
        else:
            cv_doc = cross_validate_choice(cands, oref, ks=ks, n_splits=cv, level=level, seed=seed, baselines=bases,
                                           groups=None if labels is None else [labels[n] for n in names])
            in_sample = [(row["kendall_tau"], row["signal"]) for row in rows if row["signal"] in cands and row["kendall_tau"] is not None]
            best = max(in_sample, key=lambda t: t[0]) if in_sample else None  # the first of the best, as the splits choose
            cv_doc["in_sample_best"] = None if best is None else {"signal": best[1], "kendall_tau": best[0]}
            cv_doc["candidates"] = list(cands)
    by_name = {row["signal"]: row for row in rows}
    compared: List[Dict[str, Any]] = []
    for a, b in pairs:
        ra, rb = (_compare_row(x, by_name) for x in (a, b))
        both = np.isfinite(ra["_oriented"]) & np.isfinite(rb["_oriented"])
        if both.sum() < 2:
            compared.append({"a": ra["signal"], "b": rb["signal"], "runs": [], "n_runs": int(both.sum()), "difference": None,
                             "interval": None, "kendall_tau_a": None, "kendall_tau_b": None,
                             "reason": "fewer than 2 runs have both"})
            continue
        run_names = [n for n, h in zip(names, both) if h]
        d = tau_difference(ra["_oriented"][both], rb["_oriented"][both], refs_all[both], reference_mode=against_mode,
                           n_boot=n_boot, level=level, seed=seed,
                           groups=None if labels is None else [labels[n] for n in run_names])
        if labels is not None and len({labels[n] for n in run_names}) < 2:
            d["interval"] = None
        compared.append({"a": ra["signal"], "b": rb["signal"], "runs": run_names, **d})
    for row in rows:
        row.pop("_oriented")
    return {"against": against, "against_mode": against_mode, "at": at, "where": [where] if isinstance(where, str) else list(where),
            "runs": out_runs, "skipped": skipped, "signals": rows, "not_evaluated": base_left + left_out, "ks": ks,
            "bootstrap": _bootstrap_doc(n_boot, level, seed, boot_draws, grouping), "cv": cv_doc, "underfit": underfit,
            "grouping": grouping, "compare": compared}


def _parse_compare(compare: Any) -> List[Tuple[str, str]]:
    """``["A,B", ("C", "D")]`` -> ``[(A, B), (C, D)]`` (a bare ``"A,B"`` is one pair)."""
    if isinstance(compare, str):
        compare = [compare]
    out: List[Tuple[str, str]] = []
    for item in compare or ():
        parts = [p.strip() for p in item.split(",")] if isinstance(item, str) else [str(p).strip() for p in item]
        if len(parts) != 2 or not all(parts):
            raise SelectionError(f"Expected each comparison as two signals 'A,B' (e.g. 'train/loss,netprobe/reliance_auc'), but got {item!r}.")
        out.append((parts[0], parts[1]))
    return out


def _compare_row(spec: str, by_name: Mapping[str, Dict[str, Any]]) -> Dict[str, Any]:
    key = spec
    if key not in by_name:
        key, _ = parse_signal(spec)  # 'train/loss:min' names the row 'train/loss'
    if key not in by_name:
        raise SelectionError(
            f"Cannot compare {spec!r}: it is not one of the table's signals. Closest: {close_names(key, list(by_name))}. "
            "Add it with --signals / --baseline (signals=, baselines=), or name a row as printed."
        )
    return by_name[key]
