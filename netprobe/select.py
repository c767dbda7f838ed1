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

Everything returned is plain data (dicts, lists, floats).
"""

from __future__ import annotations

import bisect
import math
import operator
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from netprobe._validation import close_names

__all__ = ["SelectionError", "Run", "find_runs", "load_run", "load_runs", "rank_runs", "parse_condition", "spearman_rho", "kendall_tau", "top_k_hits"]


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
    """Why the TFRecord file at ``path`` cannot be read to its end (None when it can).

    TensorBoard's reader stops silently at the first corrupt or truncated record (it takes it for
    a record still being written), which would rank a run by the values logged before it. Each
    record is ``uint64 length, uint32 masked CRC-32C of the length, data, uint32 masked CRC-32C of
    the data``; every checksum is verified here.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    name = os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            offset = 0
            while True:
                head = fh.read(12)
                if not head:
                    return None
                if len(head) < 12:
                    return f"truncated record at byte {offset} of {name}"
                if struct.unpack("<I", head[8:])[0] != masked_crc32c(head[:8]):
                    return f"corrupt record at byte {offset} of {name} (length checksum mismatch)"
                (length,) = struct.unpack("<Q", head[:8])
                data = fh.read(length)
                crc = fh.read(4)
                if len(data) < length or len(crc) < 4:
                    return f"truncated record at byte {offset} of {name}"
                if struct.unpack("<I", crc)[0] != masked_crc32c(data):
                    return f"corrupt record at byte {offset} of {name} (data checksum mismatch)"
                offset += 16 + length
    except OSError as err:
        return f"cannot read {name}: {err}"


def load_run(path: str, name: Optional[str] = None) -> Run:
    """Read every scalar and the hyperparameters of the run at ``path`` (sub-directories included).

    An event file with a corrupt or truncated record sets ``run.error`` (the run is then skipped by
    :func:`rank_runs`, with that reason): its values after the bad record are lost, so whatever was
    read before it would misrepresent the run.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Run(name or os.path.basename(os.path.normpath(path)), path)
    series: Dict[str, Dict[int, float]] = {}
    for root, _, files in sorted(os.walk(path)):
        if not any(_is_event_file(f) for f in files):
            continue
        for f in sorted(files):
            why = _check_event_file(os.path.join(root, f)) if _is_event_file(f) and run.error is None else None
            if why:
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
    return s / den if den > 0 else float("nan")


def top_k_hits(
    signal: Sequence[float], reference: Sequence[float], ks: Iterable[int], *, mode: str = "max",
    reference_mode: str = "max", subset_size: Optional[int] = None, n_draws: int = 10_000, seed: int = 0,
) -> Dict[int, float]:
    """Probability that the run with the best signal in a random subset is in that subset's top ``k``
    by the reference (module docstring). Ties are broken at random, in expectation: a tie for the
    best signal averages over the tied runs, and a run tied with ``e`` others by the reference, with
    ``b`` runs strictly better, is in the top ``k`` with probability ``clip((k - b) / (e + 1), 0, 1)``."""
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


# ----------------------------------------------------------------------------- ranking
def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


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
) -> Dict[str, Any]:
    """Rank the runs under ``logdir`` by ``metric``; see the module docstring.

    ``where``: conditions such as ``"netprobe/probe_accuracy>=0.99"``; runs failing one are skipped.

    ``top_k``: the ``k`` of the hit rates; each must be below the subset size (the number of runs
    ranked, by default), since any pick is in the top ``k >= subset size``: ``SelectionError``
    otherwise. The default, ``None``, takes those of 1, 5, 10 below it.

    ``spearman_rho`` and ``kendall_tau`` are oriented by ``mode`` and ``against_mode``: positive
    when the runs the signal prefers are those the reference prefers (1 = the same order), whatever
    the modes. A run whose event file has a corrupt or truncated record is skipped, with the reason.

    Returns:
        ``{"metric", "mode", "at", "against", "where", "runs": [...], "skipped": [...], "spearman_rho",
        "kendall_tau", "pick", "pick_ties", "pick_reference_rank", "top_k", "subset_size", "n_draws"}``
        (``pick_ties``: the runs tied for the best signal, ``pick`` the first by name; with a tie,
        ``pick_reference_rank`` is their mean reference rank); each run is
        ``{"rank", "run", "path", "hparams", "signal", "reference", "reference_rank"}`` (best first).
    """
    if mode not in ("max", "min") or against_mode not in ("max", "min"):
        raise SelectionError(f"Expected `mode` and `against_mode` to be 'max' or 'min', but got {mode!r}, {against_mode!r}.")
    if not (at in ("last", "best") or (isinstance(at, int) and not isinstance(at, bool) and at >= 0)):
        raise SelectionError(f"Expected `at` to be 'last', 'best' or an epoch number >= 0, but got {at!r}.")
    if isinstance(where, str):
        where = [where]
    conds = [parse_condition(c) for c in where]
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
    for key in [metric] + ([against] if against else []) + [k for k, _, _ in conds]:
        if not any(key in r.scalars for r in runs):
            raise SelectionError(
                f"No run logged {key!r}. Closest keys: {close_names(key, all_tags)}. "
                f"({len(all_tags)} keys exist; netprobe keys start with 'netprobe/'.)"
            )
    rows, skipped = [], list(bad)
    for r in runs:
        failed = None
        for key, op, val in ([] if at == "best" else conds):  # with "best": checked per measurement below
            v = _condition_value(r, key, at if isinstance(at, int) else None)
            if not _holds(v, op, val):
                why_c = _value_at(r, key, at if isinstance(at, int) else "last", "max")[1] if v is None else None
                failed = why_c or (f"no {key!r}" if v is None else f"{key}={v:.4g} fails {op} {val:g}")
                break
        if failed:
            skipped.append({"run": r.name, "path": r.path, "reason": failed})
            continue
        sig, why = _best_where(r, metric, mode, conds) if at == "best" and conds else _value_at(r, metric, at, mode)
        ref, why_ref = (_value_at(r, against, "last", against_mode) if against else (None, None))
        if sig is None or not np.isfinite(sig):
            skipped.append({"run": r.name, "path": r.path, "reason": why or "non-finite signal"})
            continue
        if against and (ref is None or not np.isfinite(ref)):
            skipped.append({"run": r.name, "path": r.path, "reason": why_ref or "non-finite reference"})
            continue
        rows.append({"run": r.name, "path": r.path, "hparams": dict(r.hparams), "signal": float(sig),
                     "reference": None if ref is None else float(ref)})
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda d: (sign * d["signal"], d["run"]))
    for i, d in enumerate(rows, 1):
        d["rank"] = i
    out: Dict[str, Any] = {"metric": metric, "mode": mode, "at": at, "against": against, "where": list(where),
                           "runs": rows, "skipped": skipped,
                           "spearman_rho": None, "kendall_tau": None, "pick": rows[0]["run"] if rows else None,
                           "pick_ties": [d["run"] for d in rows if rows and d["signal"] == rows[0]["signal"]],
                           "pick_reference_rank": None, "top_k": {}, "subset_size": None, "n_draws": None}
    if against and rows:
        refs = np.array([d["reference"] for d in rows])
        rsign = -1 if against_mode == "max" else 1
        ref_order = _rankdata(rsign * refs)  # 1 = best reference (ties: average)
        for d, rr in zip(rows, ref_order):
            d["reference_rank"] = float(rr)
        tied = len(out["pick_ties"])  # a tie for the best signal: the expected rank of a random pick among them
        out["pick_reference_rank"] = float(np.mean(ref_order[:tied]))
        if len(rows) >= 2:
            sigs = [d["signal"] for d in rows]
            m = subset_size if subset_size is not None else len(rows)
            if not 1 <= m <= len(rows):
                raise SelectionError(
                    f"Expected `subset_size` in [1, {len(rows)}] (the number of runs ranked), but got {subset_size}."
                )
            if top_k is None:
                ks = [k for k in (1, 5, 10) if k < m]
            else:
                ks = sorted({int(k) for k in top_k})
                too_big = [k for k in ks if k >= m]
                if too_big:
                    raise SelectionError(
                        f"Expected every top-k below the subset size {m} ({_plural(len(rows), 'run')} ranked"
                        f"{'' if subset_size is None else f', --subset-size {m}'}), but got k={too_big[0]}: every pick "
                        f"is among the top {m} of {m}, so its hit rate is 1 whatever the signal. Use k < {m}."
                    )
            # oriented so that agreement is positive whatever the modes (a "min" side is negated)
            osig = [v if mode == "max" else -v for v in sigs]
            oref = refs if against_mode == "max" else -refs
            rho, tau = spearman_rho(osig, oref), kendall_tau(osig, oref)  # NaN when a side is constant
            out["spearman_rho"] = None if np.isnan(rho) else rho
            out["kendall_tau"] = None if np.isnan(tau) else tau
            out["subset_size"], out["n_draws"] = m, (1 if m == len(rows) else n_draws)
            out["top_k"] = {str(k): p for k, p in top_k_hits(sigs, refs, ks, mode=mode, reference_mode=against_mode,
                                                              subset_size=m, n_draws=n_draws, seed=seed).items()} if ks else {}
    return out
