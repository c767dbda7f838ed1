"""The two ranking pipelines: :func:`rank_runs` (the runs by one signal, checked against a
reference) and :func:`rank_signals` (one row per signal, with intervals, random baselines, a
cross-validated choice and paired comparisons). Both return plain data.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple, Union

import numpy as np

from netprobe._validation import close_names
from netprobe.select.errors import SelectionError, _plural
from netprobe.select.events import Run, load_runs
from netprobe.select.grouping import _grouping, _underfit
from netprobe.select.keys import (
    _GLOB_CHARS,
    _NOT_SIGNALS,
    _netprobe_parts,
    key_direction,
    parse_condition,
    parse_signal,
)
from netprobe.select.layers import _resolve_key
from netprobe.select.stats import (
    _check_count,
    _check_level,
    _rankdata,
    bootstrap_intervals,
    cross_validate_choice,
    kendall_tau,
    spearman_rho,
    tau_difference,
    top_k_hits,
)
from netprobe.select.strata import stratum_labels, width_confound
from netprobe.select.values import _fails_conditions, _signal_value, _value_at


def _directed(key: str, mode: Optional[str], what: str, flag: str) -> Tuple[str, str]:
    """``(key, direction)`` of a key that may end in ``:min``/``:max``: the suffix, else ``mode``,
    else the key's known direction (:func:`key_direction`); a key with none is refused, naming
    ``flag`` (the argument that gives it)."""
    name, suffix = parse_signal(key)
    if suffix is not None and mode is not None and suffix != mode:
        raise SelectionError(f"Expected one direction for {what} {name!r}, but got {key!r} and {flag}={mode!r}.")
    direction = suffix or mode or key_direction(name)
    if direction is None:
        raise SelectionError(
            f"{what.capitalize()} {name!r} has no known direction (netprobe knows its own keys, and keys with a word 'loss' "
            f"(lower is better) or 'acc'/'accuracy' (higher)): pass {name + ':min'!r} or {name + ':max'!r}, or {flag}='min' "
            "or 'max'.")
    return name, direction


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
                    + (f" For the mean over layers, name {base!r} without '@deepest' (`netprobe rank --metric {base}`)."
                       if base in all_tags else "")
                )
            return
        key = f"{base}/{layer}"
    if not any(key in r.scalars for r in runs):
        raise SelectionError(
            f"No run logged {key!r}. Closest keys: {close_names(key, all_tags)}. "
            f"({len(all_tags)} keys exist; netprobe keys start with 'netprobe/'.)"
        )


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


@dataclass(frozen=True)
class _Draws:
    """How a ranking's statistics are drawn, the same for every signal it evaluates."""

    #: random subsets for the hit rates when the subset size is below the runs ranked
    n_draws: int
    #: bootstrap replicates (0: no intervals)
    n_boot: int
    #: the intervals' level
    level: float
    #: seeds the hit-rate subsets and the bootstrap
    seed: int


def _statistics(sigs: Sequence[float], refs: Sequence[float], *, mode: str, against_mode: str, ks: Sequence[int], m: int,
                draws: _Draws, boot_order: Optional[Sequence[int]] = None, groups: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """tau, rho (oriented: agreement positive), hit rates, their random baseline k/m and bootstrap
    intervals; the bootstrap resamples the runs in ``boot_order`` (by run name), so that the same
    runs get the same resamples whichever function ranks them."""
    osig = np.asarray(sigs, dtype=np.float64) * (1 if mode == "max" else -1)
    oref = np.asarray(refs, dtype=np.float64) * (1 if against_mode == "max" else -1)
    rho, tau = spearman_rho(osig, oref), kendall_tau(osig, oref)  # NaN when a side is constant
    out: Dict[str, Any] = {
        "spearman_rho": None if np.isnan(rho) else rho, "kendall_tau": None if np.isnan(tau) else tau,
        "subset_size": m, "n_draws": 1 if m == len(osig) else draws.n_draws,
        "top_k": {str(k): p for k, p in top_k_hits(sigs, refs, ks, mode=mode, reference_mode=against_mode, subset_size=m,
                                                      n_draws=draws.n_draws, seed=draws.seed).items()} if ks else {},
        "top_k_ci_undefined": None,
        "top_k_random": {str(k): k / m for k in ks},
        "spearman_rho_ci": None, "kendall_tau_ci": None, "top_k_ci": {},
    }
    if groups is not None and len(set(groups)) < 2:
        out["bootstrap_undefined"] = {"reason": "its runs are all in one group: nothing to resample"}
    elif draws.n_boot > 0:
        order = np.arange(len(osig)) if boot_order is None else np.asarray(boot_order)
        ci = bootstrap_intervals(np.asarray(sigs, dtype=np.float64)[order], np.asarray(refs, dtype=np.float64)[order], mode=mode,
                                 reference_mode=against_mode, ks=ks, subset_size=m, n_boot=draws.n_boot,
                                 level=draws.level, n_draws=draws.n_draws, seed=draws.seed,
                                 groups=None if groups is None else [groups[i] for i in order])
        out["spearman_rho_ci"], out["kendall_tau_ci"] = ci["spearman_rho"], ci["kendall_tau"]
        out["top_k_ci"] = {str(k): v for k, v in ci["top_k"].items()}
        out["top_k_ci_undefined"] = ci["top_k_undefined"]
        out["bootstrap_undefined"] = ci["undefined"]
    return out


def _bootstrap_doc(draws: _Draws, grouping: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The ``bootstrap`` entry of a ranking: how its intervals were drawn and what they cover (None without any)."""
    n_boot, level, seed = draws.n_boot, draws.level, draws.seed
    hit_rates = ("a delete-one jackknife over the hit rates' own subsets (never a run twice; undefined when the "
                 "subset holds every run)")
    if n_boot <= 0:
        return None
    if grouping is None:
        return {"n_boot": n_boot, "level": level, "seed": seed, "interval": "percentile", "hit_rates": hit_rates,
                "resampled": "runs",
                "covers": "the spread of each statistic over sweeps like this one (the runs resampled with replacement)"}
    return {"n_boot": n_boot, "level": level, "seed": seed, "interval": "percentile", "hit_rates": hit_rates,
            "resampled": "groups", "n_groups": grouping["n_groups"],
            "covers": "the spread of each statistic over sweeps like this one (the groups resampled with replacement, "
                      "each with all its runs: a cluster bootstrap)"}


def rank_runs(
    logdir: Union[str, os.PathLike],
    metric: str,
    *,
    mode: Optional[str] = None,
    at: Union[str, int] = "last",
    against: Optional[str] = None,
    against_mode: Optional[str] = None,
    top_k: Optional[Sequence[int]] = None,
    subset_size: Optional[int] = None,
    n_draws: int = 10_000,
    seed: int = 0,
    where: Sequence[str] = (),
    layer: Optional[str] = None,
    n_boot: int = 1000,
    level: float = 0.95,
    underfit_below: Optional[float] = None,
    group: Optional[str] = None,
    group_by: Union[str, Sequence[str]] = (),
    within: Sequence[str] = (),
    across: bool = False,
) -> Dict[str, Any]:
    """Rank the runs under ``logdir`` by ``metric``; see the module docstring.

    **Strata.** Runs are comparable when their monitored layers are the same, of the same module
    types, with the same widths (``netprobe/layer_units/<layer>`` and
    ``netprobe/layer_type/<layer>/<Type>``, logged once per fit by the monitors), and, with ``within``,
    the same values of those hyperparameters. ``strata`` lists each stratum (``label``, ``runs``,
    its own ``pick`` and, with ``against``, its statistics). When the runs form several strata, the
    top-level ``pick`` and statistics are ``None`` (``not_comparable`` says why) unless ``across``,
    which ranks them together and reports ``confound``: Kendall's tau-b of the signal with the
    total width of the monitored layers (what the pick mixes in: reliance rises with width).

    ``metric`` may be a layer alias: ``"netprobe/<metric>@deepest"`` takes, per run, the deepest
    monitored layer's ``netprobe/<metric>/<layer>`` (see :func:`layer_order` for how "deepest" is
    known; a run whose logs do not tell is skipped, with the reason), ``"netprobe/<metric>@<layer>"``
    that layer's key. ``layer="deepest"`` (or a layer name) is the same as writing ``@layer``.

    ``where``: conditions such as ``"netprobe/probe_accuracy>=0.99"``; runs failing one are skipped.

    ``top_k``: the ``k`` of the hit rates; each must be below the subset size (the number of runs
    ranked, by default), since any pick is in the top ``k >= subset size``: ``SelectionError``
    otherwise. The default, ``None``, takes those of 1, 5, 10 below it. Beside each hit rate,
    ``top_k_random`` holds a random pick's ``k / m``.

    ``mode`` (is a higher ``metric`` better: ``"max"``, or ``"min"``) and ``against_mode`` (the
    same for the reference ``against``; ``against`` may also end in ``:min`` or ``:max``) default
    to the key's known direction (:func:`key_direction`: netprobe's keys, and keys with a word
    ``loss`` or ``acc``); a key with none is refused (``SelectionError``), never taken as
    higher-is-better. ``spearman_rho`` and ``kendall_tau`` are oriented by both: positive
    when the runs the signal prefers are those the reference prefers (1 = the same order), whatever
    the modes. A run whose event file has a corrupt or truncated record is skipped, with the reason.

    ``n_boot`` (0: none), ``level``: percentile bootstrap intervals over runs for rho and tau
    (:func:`bootstrap_intervals`, seeded with ``seed``, over the runs sorted by name), and for the
    hit rates :func:`top_k_intervals`' jackknife over their own subsets (``top_k_ci``; None with the
    reason in ``top_k_ci_undefined`` when the subset holds every run).
    ``group`` (a regex on the run names) and/or ``group_by`` (hyperparameter names): see
    :func:`group_labels`; the bootstrap then resamples the groups (a cluster bootstrap: the seeds of
    one configuration are not independent runs, and resampling them as if they were gives intervals
    too narrow). ``bootstrap["resampled"]`` says which; ``grouping`` describes the groups and each
    run has its ``group``.

    Runs whose ``netprobe/probe_accuracy`` is far below the others' are flagged, not dropped: below
    ``underfit_below`` when given, else below the median minus ``max(3 x 1.4826 x MAD, 0.05)``
    (read at the signal's epoch with an epoch ``at``, else at its last value).

    Returns:
        ``{"metric", "mode", "at", "against", "where", "runs": [...], "skipped": [...], "moot": [{"option",
        "why"}] (options given that had nothing to act on), "spearman_rho",
        "kendall_tau", "spearman_rho_ci", "kendall_tau_ci", "pick", "pick_ties", "pick_reference_rank",
        "top_k", "top_k_ci", "top_k_random", "subset_size", "n_draws", "bootstrap", "underfit", "layer_source",
        "grouping"}``
        (``pick_ties``: the runs tied for the best signal, ``pick`` the first by name; with a tie,
        ``pick_reference_rank`` is their mean reference rank; ``underfit``: ``{"key", "threshold",
        "rule", "runs", "values"}``); each run is ``{"rank", "run", "path", "hparams", "signal",
        "reference", "reference_rank", "key", "underfit", "group"}`` (best first; ``key``: the key read;
        ``group``: its group label, or None without grouping).
    """
    draws = _Draws(n_draws, _check_count(n_boot, "n_boot", 0, "bootstrap replicates; 0 for none"), _check_level(level), seed)
    metric = _metric_key(metric, layer)
    runs, bad, all_tags = _load_readable(logdir)
    against_key = parse_signal(against)[0] if against else None
    for key in [metric] + ([against_key] if against_key else []) + [k for k, _, _ in _check_common("max", "max", at, where, underfit_below)]:
        _require_key(key, runs, all_tags)
    metric, mode = _directed(metric, mode, "the signal", "mode")
    against, against_mode = _directed(against, against_mode, "the reference", "against_mode") if against else (None, "max")
    conds = _check_common(mode, against_mode, at, where, underfit_below)
    read = _read_rows(runs, metric, mode=mode, at=at, against=against, against_mode=against_mode, conds=conds)
    rows = read.rows
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
                           "runs": rows, "skipped": list(bad) + read.skipped,
                           "spearman_rho": None, "kendall_tau": None, "spearman_rho_ci": None, "kendall_tau_ci": None,
                           "pick": rows[0]["run"] if rows else None,
                           "pick_ties": [d["run"] for d in rows if rows and d["signal"] == rows[0]["signal"]],
                           "pick_reference_rank": None, "top_k": {}, "top_k_ci": {}, "top_k_random": {},
                           "subset_size": None, "n_draws": None, "bootstrap": None, "underfit": underfit,
                           "layer_source": sorted(read.sources), "grouping": grouping}
    by_name = {r.name: r for r in ranked}
    strata = stratum_labels(ranked, within)
    names = list(dict.fromkeys(strata[d["run"]] for d in rows))
    mixed = len(names) > 1
    out["strata"], out["within"] = [], list(within)
    for label in names:
        members = [dict(d) for d in rows if strata[d["run"]] == label]
        entry: Dict[str, Any] = {"label": label, "runs": [d["run"] for d in members], "n_runs": len(members),
                                 "pick": members[0]["run"],
                                 "pick_ties": [d["run"] for d in members if d["signal"] == members[0]["signal"]]}
        if against and mixed:  # each stratum's own statistics (one stratum: the top level's)
            m_s = len(members) if subset_size is None or subset_size > len(members) else subset_size
            entry.update(_against_statistics(members, len(entry["pick_ties"]), metric=metric, mode=mode,
                                             against_mode=against_mode,
                                             top_k=None if top_k is None else [k for k in top_k if k < m_s],
                                             subset_size=None if m_s == len(members) else m_s, draws=draws,
                                             grouped=labels is not None, grouping=grouping))
        out["strata"].append(entry)
    out["across"] = bool(across)
    out["confound"] = width_confound([d["signal"] for d in rows], [by_name[d["run"]] for d in rows]) if mixed else None
    if mixed and not across:
        out["pick"], out["pick_ties"] = None, []
        out["not_comparable"] = (f"the runs form {len(out['strata'])} strata of other monitored layers or widths (see "
                                 "strata): each is ranked on its own; pass across=True (--across) for a pick across them")
    elif against and rows:
        out.update(_against_statistics(rows, len(out["pick_ties"]), metric=metric, mode=mode, against_mode=against_mode,
                                       top_k=top_k, subset_size=subset_size, draws=draws, grouped=labels is not None,
                                       grouping=grouping))
    out["moot"] = _moot_options(len(rows), against, top_k=top_k, subset_size=subset_size)
    return out


def _comparable(pool: Sequence[Any], within: Sequence[str], across: bool) -> List[Dict[str, Any]]:
    """The strata of the reference pool's runs (``{"label", "runs", "n_runs"}``); several are
    refused unless ``across`` (a table judges each signal over one set of comparable runs)."""
    labels = stratum_labels([p.run for p in pool], within)
    strata = [{"label": lab, "runs": [n for n, v in labels.items() if v == lab]} for lab in dict.fromkeys(labels.values())]
    for st in strata:
        st["n_runs"] = len(st["runs"])
    if len(strata) > 1 and not across:
        listed = "; ".join(f"{st['label']} ({_plural(st['n_runs'], 'run')})" for st in strata)
        raise SelectionError(
            f"The runs are not comparable: they form {len(strata)} strata of other monitored layers or widths ({listed}). "
            "Rank one stratum at a time (where=/--where on a hyperparameter), or pass across=True (--across) to judge "
            "the signals across them, with each signal's tau against the total width reported beside it.")
    return strata


def _moot_options(n_rows: int, against: Optional[str], *, top_k: Optional[Sequence[int]],
                  subset_size: Optional[int]) -> List[Dict[str, str]]:
    """The options given that had nothing to act on (``{"option", "why"}``): hit rates need a
    reference and 2 runs or more."""
    why = (None if against and n_rows >= 2 else
           "no reference to judge by (against)" if not against else
           f"{_plural(n_rows, 'run')} left to rank (the statistics need 2)")
    if why is None:
        return []
    given = [("top_k", top_k), ("subset_size", subset_size)]
    return [{"option": name, "why": why} for name, value in given if value is not None]


def _metric_key(metric: str, layer: Optional[str]) -> str:
    """``rank_runs``' signal key: ``metric`` with ``layer`` as its ``@`` alias, a layer alias checked."""
    if layer is not None:
        if "@" in metric or (_netprobe_parts(metric) or ("", None))[1] is not None:
            raise SelectionError(f"Expected `layer` only with a metric without a layer (e.g. 'netprobe/reliance_auc'), but got {metric!r}.")
        metric = f"{metric}@{layer}"
    metric, _ = parse_signal(metric) if "@" in metric else (metric, None)
    return metric


class _RunRows(NamedTuple):
    """What ``rank_runs`` read of each run: the rows it ranks, the runs it skipped, the layer orders' sources."""

    #: ``{"run", "path", "hparams", "signal", "reference", "key"}`` per run ranked, in the runs' order
    rows: List[Dict[str, Any]]
    #: ``{"run", "path", "reason"}`` per run skipped
    skipped: List[Dict[str, Any]]
    #: where the layer order of a ``@deepest`` alias came from
    sources: Set[str]


def _read_rows(runs: Sequence[Run], metric: str, *, mode: str, at: Union[str, int], against: Optional[str], against_mode: str,
               conds: Sequence[Tuple[str, str, float]]) -> _RunRows:
    """Each run's signal and reference, or why it is skipped: a failed condition, no key for the
    alias, no finite signal, no finite reference (the first that applies)."""
    rows, skipped, sources = [], [], set()
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
    return _RunRows(rows, skipped, sources)


def _against_statistics(rows: List[Dict[str, Any]], n_ties: int, *, metric: str, mode: str, against_mode: str,
                        top_k: Optional[Sequence[int]], subset_size: Optional[int], draws: _Draws, grouped: bool,
                        grouping: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``rank_runs``' entries that need the reference: each row's ``reference_rank`` (set on the
    rows, sorted best signal first), the pick's mean reference rank over the ``n_ties`` runs tied
    for the best signal, and with 2 rows or more the statistics and the bootstrap's description."""
    refs = np.array([d["reference"] for d in rows])
    rsign = -1 if against_mode == "max" else 1
    ref_order = _rankdata(rsign * refs)  # 1 = best reference (ties: average)
    for d, rr in zip(rows, ref_order):
        d["reference_rank"] = float(rr)
    out: Dict[str, Any] = {"pick_reference_rank": float(np.mean(ref_order[:n_ties]))}  # a random pick among the tied
    if len(rows) >= 2:
        m = subset_size if subset_size is not None else len(rows)
        if not 1 <= m <= len(rows):
            raise SelectionError(
                f"Expected `subset_size` in [1, {len(rows)}] (the number of runs ranked), but got {subset_size}."
            )
        ks = _resolve_ks(top_k, {metric: (len(rows), m)}, subset_size is not None)
        out.update(_statistics([d["signal"] for d in rows], refs, mode=mode, against_mode=against_mode, ks=ks, m=m, draws=draws,
                               boot_order=sorted(range(len(rows)), key=lambda i: rows[i]["run"]),
                               groups=[d["group"] for d in rows] if grouped else None))
        out["bootstrap"] = _bootstrap_doc(draws, grouping)
    return out

def _expand_signals(specs: Sequence[str], runs: Sequence[Run], all_tags: Sequence[str], exclude: Sequence[str],
                    kind: str) -> Tuple[List[Tuple[str, str, str]], List[Dict[str, str]]]:
    """Signal specs -> ``[(key, direction, kind)]`` and ``[{"signal", "reason"}]`` left out."""
    netprobe = [t for t in all_tags if (_netprobe_parts(t) or ("time", None))[0] not in _NOT_SIGNALS and t not in exclude]
    per_layer = sorted({f"netprobe/{p[0]}@deepest" for p in map(_netprobe_parts, netprobe) if p and p[1] is not None})
    candidates = sorted(set(netprobe) | set(per_layer))
    facts = {t for t in all_tags if (_netprobe_parts(t) or ("", None))[0] in _NOT_SIGNALS}  # time, layer_index, ...
    others = sorted(set(all_tags) - set(netprobe) - set(exclude) - facts - {"epoch"})
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
    against_mode: Optional[str] = None,
    at: Union[str, int] = "last",
    where: Union[str, Sequence[str]] = (),
    top_k: Optional[Sequence[int]] = None,
    subset_size: Optional[int] = None,
    n_draws: int = 10_000,
    n_boot: int = 1000,
    level: float = 0.95,
    cv: int = 200,
    seed: int = 0,
    underfit_below: Optional[float] = None,
    group: Optional[str] = None,
    group_by: Union[str, Sequence[str]] = (),
    compare: Sequence[Union[str, Sequence[str]]] = (),
    within: Sequence[str] = (),
    across: bool = False,
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

    The reference ``against`` (``KEY``, ``KEY:min`` or ``KEY:max``) is oriented by its suffix, else
    ``against_mode``, else its known direction (:func:`key_direction`); one with none is refused.

    Runs whose monitored layers or widths differ (the strata of :func:`rank_runs`, refined by
    ``within``) are not comparable: several strata are refused unless ``across``, which judges the
    signals over all of them and gives each row ``confound`` (the signal's tau with the total width
    of the monitored layers). ``strata`` lists them.

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
    if not against:
        raise SelectionError("Expected `against`, the reference key (e.g. 'test/acc'), to judge the signals by, but got none.")
    against, against_mode = _directed(against, against_mode, "the reference", "against_mode")
    conds = _check_common("max", against_mode, at, where, underfit_below)
    n_boot = _check_count(n_boot, "n_boot", 0, "bootstrap replicates; 0 for none")
    cv = _check_count(cv, "cv", 0, "random half splits; 0 for none")
    draws = _Draws(n_draws, n_boot, _check_level(level), seed)
    signals = [signals] if isinstance(signals, str) else list(signals)
    baselines = [baselines] if isinstance(baselines, str) else list(baselines)
    pairs = _parse_compare(compare)
    if not signals and not baselines:
        raise SelectionError("Expected at least one signal or baseline, but got none. Pass signals=['all'] for every netprobe key.")
    runs, bad, all_tags = _load_readable(logdir)
    for key in [against] + [k for k, _, _ in conds]:
        _require_key(key, runs, all_tags)
    pool, skipped = _reference_pool(runs, against, against_mode, at, conds, bad)
    strata = _comparable(pool, within, across)
    labels, grouping = _grouping([p.run for p in pool], group, group_by)
    order, not_evaluated = _signal_order(signals, baselines, runs, all_tags, against)
    names = [p.run.name for p in pool]
    refs = np.array([p.reference for p in pool])
    rows = [_signal_row(key, direction, kind, pool, at, conds) for key, (direction, kind) in order.items()]
    sizes = _subset_sizes(rows, subset_size)
    ks = _resolve_ks(top_k, sizes, subset_size is not None)
    for row in rows:
        _row_statistics(row, names, refs, sizes=sizes, ks=ks, against_mode=against_mode, draws=draws, labels=labels)
        if len(strata) > 1:
            have = [i for i, n in enumerate(names) if n in row["values"]]
            row["confound"] = width_confound([row["values"][names[i]] for i in have], [pool[i].run for i in have])
    underfit = _underfit([p.run for p in pool], at, underfit_below)
    out_runs = [{"run": r.name, "path": r.path, "hparams": dict(r.hparams), "reference": ref,
                 "probe_accuracy": underfit["values"].get(r.name), "underfit": r.name in underfit["runs"],
                 "group": None if labels is None else labels[r.name]} for r, ref in pool]
    cv_doc = _cv_doc(rows, refs, names, n_splits=cv, ks=ks, against_mode=against_mode, draws=draws, labels=labels,
                     grouping=grouping) if cv > 0 else None
    compared = _comparisons(pairs, rows, names, refs, against_mode=against_mode, draws=draws, labels=labels)
    for row in rows:
        row.pop("_oriented")
    return {"strata": strata, "across": bool(across),
            "against": against, "against_mode": against_mode, "at": at, "where": [where] if isinstance(where, str) else list(where),
            "runs": out_runs, "skipped": skipped, "signals": rows, "not_evaluated": not_evaluated, "ks": ks,
            "bootstrap": _bootstrap_doc(draws, grouping), "cv": cv_doc, "underfit": underfit,
            "grouping": grouping, "compare": compared}


class _PoolRun(NamedTuple):
    """A run ``rank_signals`` judges signals on, with its reference (its last finite value)."""

    run: Run
    reference: float


def _reference_pool(runs: Sequence[Run], against: str, against_mode: str, at: Union[str, int],
                    conds: Sequence[Tuple[str, str, float]], bad: Sequence[Dict[str, Any]]) -> Tuple[List[_PoolRun], List[Dict[str, Any]]]:
    """``(the runs that meet the conditions with a finite reference, sorted by name; every run skipped,
    the unreadable ones first)``; fewer than 2 runs in the pool is refused."""
    pool, skipped = [], list(bad)
    for r in runs:
        failed = _fails_conditions(r, conds, at)
        ref, why_ref = _value_at(r, against, "last", against_mode)
        if failed is None and (ref is None or not math.isfinite(ref)):
            failed = why_ref or "non-finite reference"
        if failed:
            skipped.append({"run": r.name, "path": r.path, "reason": failed})
        else:
            pool.append(_PoolRun(r, float(ref)))  # type: ignore[arg-type]
    pool.sort(key=lambda p: p.run.name)
    if len(pool) < 2:
        raise SelectionError(
            f"Expected at least 2 runs with {against!r} to judge signals on, but got {_plural(len(pool), 'run')}"
            + (" (" + "; ".join(f"{s['run']}: {s['reason']}" for s in skipped[:5]) + ")" if skipped else "") + "."
        )
    return pool, skipped


def _signal_order(signals: Sequence[str], baselines: Sequence[str], runs: Sequence[Run], all_tags: Sequence[str],
                  against: str) -> Tuple[Dict[str, Tuple[str, str]], List[Dict[str, str]]]:
    """``({key: (direction, "signal" | "baseline")} in the table's row order: the signals, then the
    baselines; the specs left out)``. The first spec naming a key gives its direction; a key named
    as a baseline is a baseline."""
    base_rows, base_left = _expand_signals(baselines, runs, all_tags, [against], "baseline")
    sig_rows, left_out = _expand_signals(signals, runs, all_tags, [against], "signal")
    chosen: Dict[str, Tuple[str, str]] = {}
    for key, d, kind in sig_rows:
        chosen.setdefault(key, (d, kind))
    for key, d, kind in base_rows:
        chosen[key] = (d, kind)
    order = list(dict.fromkeys([k for k, _, _ in sig_rows if chosen[k][1] == "signal"] + [k for k, _, _ in base_rows]))
    return {key: chosen[key] for key in order}, base_left + left_out


def _signal_row(key: str, direction: str, kind: str, pool: Sequence[_PoolRun], at: Union[str, int],
                conds: Sequence[Tuple[str, str, float]]) -> Dict[str, Any]:
    """A signal's row before its statistics: its value per pool run (``"_values"``, NaN where missing),
    the runs missing it and why, the keys read for a layer alias and the layer orders' sources."""
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
    return {"signal": key, "kind": kind, "mode": direction, "n_runs": int(np.isfinite(vals).sum()), "missing": missing,
            "keys": keys, "layer_source": sorted(sources), "_values": vals,
            "values": {pool[i].run.name: float(vals[i]) for i in range(len(pool)) if np.isfinite(vals[i])}}


def _subset_sizes(rows: Sequence[Dict[str, Any]], subset_size: Optional[int]) -> Dict[str, Tuple[int, int]]:
    """signal -> (its runs, its subset size) for the rows with 2 runs or more; a subset size outside
    ``[1, runs]`` is refused."""
    sizes = {}
    for row in rows:
        n_s = row["n_runs"]
        if n_s >= 2:
            m = n_s if subset_size is None else int(subset_size)
            if not 1 <= m <= n_s:
                raise SelectionError(f"Expected `subset_size` in [1, {n_s}] (the runs {row['signal']} ranks), but got {subset_size}.")
            sizes[row["signal"]] = (n_s, m)
    return sizes


def _row_statistics(row: Dict[str, Any], names: Sequence[str], refs: np.ndarray, *, sizes: Mapping[str, Tuple[int, int]],
                    ks: Sequence[int], against_mode: str, draws: _Draws, labels: Optional[Mapping[str, str]]) -> None:
    """Fill a signal's row in place: its oriented values (``"_oriented"``, for the cross-validation
    and the comparisons), and for a signal with 2 runs or more its pick and statistics."""
    vals = row.pop("_values")
    have = np.isfinite(vals)
    row.update({"kendall_tau": None, "spearman_rho": None, "kendall_tau_ci": None, "spearman_rho_ci": None, "pick": None,
                "pick_ties": [], "pick_reference_rank": None, "top_k": {}, "top_k_ci": {}, "top_k_random": {},
                "subset_size": None, "n_draws": None})
    row["_oriented"] = np.where(have, vals * (1 if row["mode"] == "max" else -1), np.nan)
    if row["signal"] not in sizes:
        return
    sig, ref = vals[have], refs[have]
    run_names = [n for n, h in zip(names, have) if h]
    osig = sig * (1 if row["mode"] == "max" else -1)
    ties = [run_names[i] for i in np.flatnonzero(osig == osig.max())]
    ref_rank = _rankdata((-1 if against_mode == "max" else 1) * ref)
    row.update({"pick": ties[0], "pick_ties": ties, "pick_reference_rank": float(np.mean(ref_rank[osig == osig.max()]))})
    row.update(_statistics(sig, ref, mode=row["mode"], against_mode=against_mode, ks=ks, m=sizes[row["signal"]][1], draws=draws,
                           groups=None if labels is None else [labels[n] for n in run_names]))


def _cv_doc(rows: Sequence[Dict[str, Any]], refs: np.ndarray, names: Sequence[str], *, n_splits: int, ks: Sequence[int],
            against_mode: str, draws: _Draws, labels: Optional[Mapping[str, str]],
            grouping: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The cross-validated choice among the signals with 3 runs or more (the baselines when no
    signal has them), with the in-sample best beside it, or why it was skipped."""
    oref = refs * (1 if against_mode == "max" else -1)
    cands = {row["signal"]: row["_oriented"] for row in rows if row["kind"] == "signal" and row["n_runs"] >= 3}
    bases = {row["signal"]: row["_oriented"] for row in rows if row["kind"] == "baseline" and row["n_runs"] >= 3}
    if not cands:
        cands, bases = bases, {}
    if len(names) < 6:
        return {"skipped": f"needs at least 6 runs (halves of 3 or more), got {_plural(len(names), 'run')}"}
    if grouping is not None and grouping["n_groups"] < 4:
        return {"skipped": f"needs at least 4 groups (halves of 2 or more), got {_plural(grouping['n_groups'], 'group')}"}
    if not cands:
        return {"skipped": "no signal has 3 runs"}
    cv_doc = cross_validate_choice(cands, oref, ks=ks, n_splits=n_splits, level=draws.level, seed=draws.seed, baselines=bases,
                                   groups=None if labels is None else [labels[n] for n in names])
    in_sample = [(row["kendall_tau"], row["signal"]) for row in rows if row["signal"] in cands and row["kendall_tau"] is not None]
    best = max(in_sample, key=lambda t: t[0]) if in_sample else None  # the first of the best, as the splits choose
    cv_doc["in_sample_best"] = None if best is None else {"signal": best[1], "kendall_tau": best[0]}
    cv_doc["candidates"] = list(cands)
    return cv_doc


def _comparisons(pairs: Sequence[Tuple[str, str]], rows: Sequence[Dict[str, Any]], names: Sequence[str], refs: np.ndarray, *,
                 against_mode: str, draws: _Draws, labels: Optional[Mapping[str, str]]) -> List[Dict[str, Any]]:
    """tau(A) - tau(B) with a paired bootstrap interval for each pair, over the runs that have both."""
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
        d = tau_difference(ra["_oriented"][both], rb["_oriented"][both], refs[both], reference_mode=against_mode,
                           n_boot=draws.n_boot, level=draws.level, seed=draws.seed,
                           groups=None if labels is None else [labels[n] for n in run_names])
        if labels is not None and len({labels[n] for n in run_names}) < 2:
            d["interval"] = None
        compared.append({"a": ra["signal"], "b": rb["signal"], "runs": run_names, **d})
    return compared


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
