"""The ``netprobe`` command (also ``python -m netprobe``): a thin layer over :mod:`netprobe.select`."""

from __future__ import annotations

import argparse
import json
import os
import math
import sys
from typing import List, Optional

#: ``netprobe rank``'s signal without ``--metric``: the normalized ablation AUC at each run's
#: deepest monitored layer (``netprobe/reliance_auc@deepest``), chosen from the sweeps of
#: ``examples/hparam_selection.py`` in both regimes (docs/ranking.md)
DEFAULT_METRIC, DEFAULT_LAYER = "netprobe/reliance_auc", "deepest"


def _version() -> str:
    """The package version. Read from the installed metadata when ``netprobe`` resolved to a namespace
    package without attributes: ``python -m netprobe`` run from the directory *above* a clone named
    ``netprobe`` finds the clone itself first, and a setuptools editable install in its default
    (strict) mode does not win over it (``make setup`` installs with ``editable_mode=compat``)."""
    import netprobe

    version = getattr(netprobe, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            version = dist_version("netprobe")
        except PackageNotFoundError:  # pragma: no cover - run from a source tree never installed
            version = "unknown"
    return version


def _at(value: str):
    if value in ("last", "best"):
        return value
    try:
        epoch = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'last', 'best' or an epoch number, got {value!r}") from None
    if epoch < 0:
        raise argparse.ArgumentTypeError(f"expected an epoch number >= 0, got {epoch}")
    return epoch


def _ks(value: str) -> List[int]:
    try:
        ks = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,5,10, got {value!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return ks


def _level(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a level in (0, 1) such as 0.95, got {value!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a level in (0, 1) such as 0.95, got {value!r}")
    return v


def _count(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return v


def _seed(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a seed, an integer in [0, 2**32), got {value!r}") from None
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed, an integer in [0, 2**32), got {value!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``netprobe`` command line parser (``netprobe rank ...``)."""
    p = argparse.ArgumentParser(prog="netprobe", description="netprobe: representation signals for training runs.")
    p.add_argument("--version", action="version", version=f"netprobe {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rank", help="rank the runs of a sweep by a logged signal",
                       description="Rank the runs under LOGDIR (TensorBoard event files) by a logged signal, "
                                   "optionally against a reference key (e.g. test accuracy). A run whose event file has a "
                                   "corrupt or truncated record is skipped, with the reason. With --signals or --baseline "
                                   "(and --against): one row per signal, with bootstrap intervals, random baselines and a "
                                   "cross-validated choice of signal.")
    r.add_argument("logdir")
    r.add_argument("--metric", default=None,
                   help="signal key (default: netprobe/reliance_auc at each run's deepest layer, i.e. "
                        "netprobe/reliance_auc@deepest); netprobe/<metric>@deepest takes each run's deepest layer")
    r.add_argument("--mode", choices=("max", "min"), default=None,
                   help="is a higher signal better (max) or lower (default: the key's known direction, else max)")
    r.add_argument("--layer", default=None, metavar="deepest|NAME",
                   help="read --metric at this layer of each run: 'deepest' (the deepest monitored layer; the default "
                        "without --metric) or a layer name")
    r.add_argument("--at", type=_at, default="last", help="last | best | EPOCH (0-based)")
    r.add_argument("--against", default=None, metavar="KEY[:min|max]",
                   help="reference key, read at its last value (e.g. test/acc); its direction: the suffix, else "
                        "--against-mode, else the key's known one (netprobe's keys; a key with a word 'loss' is "
                        "lower-is-better, one with 'acc'/'accuracy' higher); any other key is refused without one")
    r.add_argument("--against-mode", choices=("max", "min"), default=None,
                   help="is a higher reference better (max, e.g. accuracy) or lower (min, e.g. loss); "
                        "spearman_rho and kendall_tau are oriented by both modes: positive = agreement")
    r.add_argument("--within", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=[],
                   metavar="HPARAM[,HPARAM]", help="refine the strata of comparable runs (the same monitored layers with "
                   "the same widths) by these hyperparameters")
    r.add_argument("--across", action="store_true",
                   help="rank runs of several strata together (the signal's tau with the total width is printed beside)")
    r.add_argument("--signals", action="append", default=[], metavar="SPEC",
                   help="evaluate several signals in one table (needs --against): 'all' (every netprobe key and "
                        "netprobe/<metric>@deepest), a glob such as 'netprobe/reliance_*', or a key; KEY:min / KEY:max "
                        "gives a direction netprobe does not know (repeatable)")
    r.add_argument("--baseline", action="append", default=[], metavar="KEY[:min|max]",
                   help="a non-netprobe key to compare with, e.g. train/loss:min (repeatable; implies the table)")
    r.add_argument("--top-k", type=_ks, default=None,
                   help="k values for the hit rates, each below the subset size (default: those of 1,5,10 below it)")
    r.add_argument("--subset-size", type=int, default=None, help="runs per resampled subset (default: all runs)")
    r.add_argument("--draws", type=int, default=10_000, help="resampled subsets (when --subset-size < runs)")
    r.add_argument("--boot", type=_count, default=1000, metavar="B",
                   help="bootstrap resamples of the runs for the intervals (default 1000; 0: no intervals)")
    r.add_argument("--level", type=_level, default=0.95, help="level of the intervals (default 0.95)")
    r.add_argument("--cv", type=_count, default=200, metavar="R",
                   help="with the table: random half splits for the cross-validated choice (default 200; 0: off)")
    r.add_argument("--underfit-below", type=float, default=None, metavar="ACC",
                   help="flag runs whose netprobe/probe_accuracy is below ACC (default: below the larger of "
                        "median - max(3 x 1.4826 x MAD, 0.05) and half the median of the upper half of the runs)")
    r.add_argument("--group", default=None, metavar="REGEX",
                   help="group the runs by a regex on their names (its first capture group, or the whole match, names "
                        r"the group; e.g. '^(c\d+)_' for the seeds of one configuration): the bootstrap resamples groups "
                        "(a cluster bootstrap) and --cv splits groups")
    r.add_argument("--group-by", action="append", default=[], metavar="HPARAM[,HPARAM]",
                   help="group the runs with equal values of these hyperparameters (repeatable; with --group: both)")
    r.add_argument("--compare", action="append", default=[], metavar="A,B",
                   help="with the table: tau(A) - tau(B) with a paired bootstrap interval (the same resamples for "
                        "both), for two of its signals or baselines (repeatable)")
    r.add_argument("--seed", type=_seed, default=0, help="seed of the bootstrap and cross-validation draws (default 0)")
    r.add_argument("--where", action="append", default=[], metavar="COND",
                   help="keep runs meeting KEY OP NUMBER, e.g. 'netprobe/probe_accuracy>=0.99' (repeatable)")
    r.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    return p


def _fmt(v, nd=4):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _ci(ci, nd=2):
    return "" if not ci else f" [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def _finite(obj):
    """JSON has no NaN/Infinity: such floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _columns(head, rows, out) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)


_HIT_INTERVALS = ("; hit rates: a delete-one jackknife over their own subsets (each run, or group, left out in turn), "
                  "none over all the runs (one pick's outcome: pass --subset-size below the number of runs)")


def _boot_line(boot) -> str:
    if not boot:
        return "no intervals (--boot 0)"
    if boot.get("resampled") == "groups":
        return (f"[lo, hi]: {boot['level']:.0%} bootstrap percentile intervals ({boot['n_boot']} resamples of the "
                f"{boot['n_groups']} groups with replacement, each with all its runs: a cluster bootstrap; seed {boot['seed']}): "
                f"how much each figure would vary over other sweeps of as many groups like these" + _HIT_INTERVALS)
    return (f"[lo, hi]: {boot['level']:.0%} bootstrap percentile intervals ({boot['n_boot']} resamples of the runs with "
            f"replacement, seed {boot['seed']}): how much each figure would vary over other sweeps of as many runs like these"
            " (runs treated as independent: with several seeds per configuration, pass --group or --group-by)" + _HIT_INTERVALS)


def _grouping_line(g) -> str:
    how = " and ".join(([f"regex '{g['regex']}' on the run names"] if g.get("regex") else [])
                       + ([f"hyperparameters {', '.join(g['by'])}"] if g.get("by") else []))
    lo, hi = g["runs_per_group"]
    per = f"{lo} runs each" if lo == hi else f"{lo}-{hi} runs each"
    return f"groups: {_plural(g['n_groups'], 'group')} by {how} ({per})"


def _compare_lines(res) -> List[str]:
    out = []
    for c in res.get("compare") or []:
        head = f"tau({c['a']}) - tau({c['b']})"
        if c["difference"] is None:
            out.append(f"  {head}: undefined ({c.get('reason') or 'a tau is undefined: a side is constant'}; {_plural(c['n_runs'], 'run')})")
            continue
        how = ("" if c["interval"] is None else
               f", paired {c['level']:.0%} bootstrap interval over "
               + (f"{c['n_groups']} groups" if c["resampled"] == "groups" else "runs"))
        out.append(f"  {head} = {c['kendall_tau_a']:.3f} - {c['kendall_tau_b']:.3f} = {c['difference']:+.3f}"
                   f"{_ci(c['interval'])} ({_plural(c['n_runs'], 'run')} with both{how})")
    return out


def _underfit_line(uf) -> str:
    if not uf["runs"]:
        return f"underfit runs: none ({uf['rule']})"
    vals = ", ".join(f"{r} ({uf['values'][r]:.3f})" for r in uf["runs"])
    return f"underfit runs (flagged, still ranked; filter with --where): {vals}; rule: {uf['rule']}"


_SOURCES = {"layer_index": "deepest by netprobe/layer_index (forward-pass position)",
            "single": "deepest = the only monitored layer"}


def _print_table(res, out) -> None:
    hp_keys = sorted({k for r in res["runs"] for k in r["hparams"]})
    flag = any(r.get("underfit") for r in res["runs"])
    head = ["rank", "run"] + hp_keys + [res["metric"]] + ([res["against"], "ref rank"] if res["against"] else []) + (["underfit"] if flag else [])
    rows = [[str(r["rank"]), r["run"]] + [_fmt(r["hparams"].get(k)) for k in hp_keys] + [_fmt(r["signal"])]
            + ([_fmt(r["reference"]), _fmt(r.get("reference_rank"), 1)] if res["against"] else [])
            + (["UNDERFIT" if r.get("underfit") else ""] if flag else []) for r in res["runs"]]
    _columns(head, rows, out)
    for s in res["skipped"]:
        print(f"skipped  {s['run']}: {s['reason']}", file=out)
    flags = {"top_k": "--top-k", "subset_size": "--subset-size", "against": "--against"}
    for m in res.get("moot") or []:
        print(f"ignored  {flags.get(m['option'], m['option'])}: {m['why'].replace('(against)', '(--against)')}", file=out)
    where = f" where {' and '.join(res['where'])}" if res.get("where") else ""
    ties = res.get("pick_ties") or []
    tie_note = f" (tied for the best signal with {', '.join(t for t in ties if t != res['pick'])})" if len(ties) > 1 else ""
    print(f"\n{_plural(len(res['runs']), 'run')} ranked by {res['metric']} ({res['mode']}, at {res['at']}){where}; "
          f"pick: {res['pick']}{tie_note}", file=out)
    for src in res.get("layer_source") or []:
        print(_SOURCES.get(src, src), file=out)
    if res.get("underfit") and res["runs"]:
        print(_underfit_line(res["underfit"]), file=out)
    if res.get("grouping"):
        print(_grouping_line(res["grouping"]), file=out)
    strata = res.get("strata") or []
    if len(strata) > 1:
        _print_strata(res, out)
        if not res.get("across"):
            return
    if res["against"] and res["runs"]:
        print(f"against {res['against']}: pick's reference rank {_fmt(res['pick_reference_rank'], 1)} of {len(res['runs'])}", file=out)
        if len(res["runs"]) >= 2 and res["spearman_rho"] is None:
            print("spearman_rho and kendall_tau undefined: the signal or the reference is the same for every run", file=out)
        elif res["spearman_rho"] is not None:
            print(f"spearman_rho {res['spearman_rho']:.3f}{_ci(res.get('spearman_rho_ci'))}   "
                  f"kendall_tau {res['kendall_tau']:.3f}{_ci(res.get('kendall_tau_ci'))}"
                  "   (oriented by --mode and --against-mode: positive = the signal prefers the runs the reference prefers)", file=out)
        if res["top_k"]:
            hits = "  ".join(f"top-{k} {p:.2f}{_ci(res.get('top_k_ci', {}).get(k))} (random {res['top_k_random'][k]:.2f})"
                             for k, p in res["top_k"].items())
            print(f"hit rates (pick by signal in subsets of {_plural(res['subset_size'], 'run')}, "
                  f"{_plural(res['n_draws'], 'draw')}): {hits}", file=out)
        if res.get("bootstrap") and res["spearman_rho"] is not None:
            print(_boot_line(res["bootstrap"]), file=out)


def _print_strata(res, out) -> None:
    """One line per stratum of comparable runs (its pick and, with a reference, tau), then the
    across-strata confound or the note that no pick is made across them."""
    print(f"\nthe runs form {len(res['strata'])} strata of comparable runs (the same monitored layers with the same "
          "widths" + (", and --within" if res.get("within") else "") + "):", file=out)
    for st in res["strata"]:
        line = f"  {st['label']}: {_plural(st['n_runs'], 'run')}, pick {st['pick']}"
        if res["against"] and st.get("kendall_tau") is not None:
            line += f", kendall_tau {st['kendall_tau']:.3f}{_ci(st.get('kendall_tau_ci'))}"
        if res["against"] and st.get("pick_reference_rank") is not None:
            line += f", pick's reference rank {_fmt(st['pick_reference_rank'], 1)} of {st['n_runs']}"
        print(line, file=out)
    conf = res.get("confound")
    if res.get("across"):
        tau = None if not conf else conf["kendall_tau"]
        print(f"--across: ranked together; the signal's kendall_tau with the {conf['with'] if conf else 'total width'}: "
              f"{_fmt(tau, 3)} (what the pick across strata mixes in)", file=out)
    else:
        print("no pick across strata (their signals are not comparable: reliance, for one, rises with width); "
              "--across ranks them together with the width confound printed", file=out)


def _print_signals(res, out) -> None:
    ks = [str(k) for k in res["ks"]]
    n = len(res["runs"])
    where = f" where {' and '.join(res['where'])}" if res.get("where") else ""
    n_sig = sum(r["kind"] == "signal" for r in res["signals"])
    n_base = len(res["signals"]) - n_sig
    print(f"{_plural(n, 'run')} judged against {res['against']} ({res['against_mode']}, its last value), signals at "
          f"{res['at']}{where}: {_plural(n_sig, 'signal')}, {_plural(n_base, 'baseline')}", file=out)
    level = f"{res['bootstrap']['level']:.0%} CI" if res["bootstrap"] else "CI"
    head = ["signal", "dir", "runs", "tau", level, "rho", level, "pick ref rank"]
    for k in ks:
        head += [f"top-{k}", level, "random"]
    rows = []
    for r in res["signals"]:
        name = r["signal"] + (" (baseline)" if r["kind"] == "baseline" else "")
        row = [name, r["mode"], str(r["n_runs"]), _fmt(r["kendall_tau"], 3), _ci(r["kendall_tau_ci"]).strip() or "-",
               _fmt(r["spearman_rho"], 3), _ci(r["spearman_rho_ci"]).strip() or "-",
               "-" if r["pick_reference_rank"] is None else f"{r['pick_reference_rank']:.1f} of {r['n_runs']}"]
        for k in ks:
            p = r["top_k"].get(k)
            row += [_fmt(p, 2), _ci(r["top_k_ci"].get(k)).strip() or "-", _fmt(r["top_k_random"].get(k), 2)]
        rows.append(row)
    print(file=out)
    _columns(head, rows, out)
    print(file=out)
    if len(res.get("strata") or []) > 1:
        listed = "; ".join(f"{st['label']} ({_plural(st['n_runs'], 'run')})" for st in res["strata"])
        print(f"--across {len(res['strata'])} strata of other monitored layers or widths ({listed}); each signal's "
              "kendall_tau with the total width of the monitored layers (what a pick across them mixes in): "
              + ", ".join(f"{r['signal']} {_fmt((r.get('confound') or {}).get('kendall_tau'), 2)}" for r in res["signals"]),
              file=out)
    print("tau = Kendall's tau-b, rho = Spearman's rho, both oriented so that agreement with the reference is positive "
          "(whatever --against-mode and each signal's direction).", file=out)
    subsets = sorted({r["subset_size"] for r in res["signals"] if r["subset_size"] and r["subset_size"] < r["n_runs"]})
    what = (f"the signal's pick in random subsets of {'/'.join(map(str, subsets))} runs" if subsets
            else "the signal's pick among all its runs")
    if ks:
        print(f"top-k: how often {what} is among the k best by the reference; random: a random pick's k/m.", file=out)
    print(_boot_line(res["bootstrap"]) + ".", file=out)
    if res.get("grouping"):
        print(_grouping_line(res["grouping"]), file=out)
    if res.get("compare"):
        print("\nPaired differences (oriented taus; > 0: the first signal ranks the runs closer to the reference):", file=out)
        for line in _compare_lines(res):
            print(line, file=out)
        print(file=out)
    for r in res["signals"]:
        for src in r["layer_source"]:
            print(f"{r['signal']}: {_SOURCES.get(src, src)}", file=out)
        if r["missing"]:
            few = "; ".join(f"{m['run']}: {m['reason']}" for m in r["missing"][:3])
            more = f"; ... ({len(r['missing'])} in all)" if len(r["missing"]) > 3 else ""
            print(f"{r['signal']}: {_plural(len(r['missing']), 'run')} without it ({few}{more})", file=out)
    for s in res["not_evaluated"]:
        print(f"not evaluated  {s['signal']}: {s['reason']}", file=out)
    for s in res["skipped"]:
        print(f"skipped  {s['run']}: {s['reason']}", file=out)
    print(_underfit_line(res["underfit"]), file=out)
    cv = res.get("cv")
    if cv is None:
        return
    print(file=out)
    if "skipped" in cv:
        print(f"cross-validated choice: not run ({cv['skipped']})", file=out)
        return
    pct = f"{cv['level']:.0%}"
    halves = (f"{cv['n_groups']} groups (no group on both sides)" if cv.get("split") == "groups" else _plural(n, 'run'))
    print(f"Cross-validated choice ({cv['n_splits']} random half splits of the {halves}): the signal with the best "
          f"tau on one half, judged on the other half (choosing and judging on the same runs overfits: the in-sample best "
          f"tau tends to overstate how the chosen signal does on new runs).", file=out)
    ht = cv["heldout_tau"]
    ib = cv.get("in_sample_best")
    print(f"  held-out tau of the chosen signal: mean {_fmt(ht['mean'], 3)}, {pct} of splits in{_ci(ht['interval'])}"
          + (f"   (in-sample best: {ib['signal']}, tau {ib['kendall_tau']:.3f})" if ib else ""), file=out)
    for k, h in cv["heldout_top_k"].items():
        if h["n"]:
            print(f"  held-out top-{k}: {h['mean']:.2f} (random {h['random']:.2f}), {pct} of splits in{_ci(h['interval'])}", file=out)
    picks = sorted(((c, s) for s, c in cv["chosen"].items() if c), key=lambda t: (-t[0], t[1]))
    used = max(cv["used"], 1)
    print("  chosen: " + ", ".join(f"{s} {c / used:.0%}" for c, s in picks)
          + (f" ({_plural(cv['n_splits'] - cv['used'], 'split')} left out: no signal had a tau)" if cv["used"] < cv["n_splits"] else ""),
          file=out)
    for s, b in cv["baselines"].items():
        print(f"  baseline {s} on the same held-out halves: tau mean {_fmt(b['mean'], 3)}, {pct} of splits in{_ci(b['interval'])}", file=out)
    print(f"  ({pct} of splits in [lo, hi]: the spread over splits; the halves overlap, so it is not a confidence interval)", file=out)


def _cli_direction(against: str, against_mode: Optional[str]) -> None:
    """Refuse, naming the flags, a reference whose direction neither ``--against KEY:min|max``,
    ``--against-mode`` nor the key itself gives."""
    from netprobe.select import SelectionError, key_direction, parse_signal

    key, suffix = parse_signal(against)
    if suffix is None and against_mode is None and key_direction(key) is None:
        raise SelectionError(f"--against {key} has no known direction: pass --against {key}:max (higher is better) or "
                             f"--against {key}:min, or --against-mode max|min.")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``netprobe`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status (2 with the error on stderr for a refused input)."""
    from netprobe.select import SelectionError, key_direction, rank_runs, rank_signals

    args = build_parser().parse_args(argv)
    try:
        table = bool(args.signals or args.baseline)
        metric = args.metric if args.metric is not None else DEFAULT_METRIC
        # the default signal is each run's deepest monitored layer (docs/ranking.md: chosen from sweeps in both regimes)
        layer = args.layer if args.layer or args.metric is not None else DEFAULT_LAYER
        if table:
            if not args.against:
                raise SelectionError("Expected --against KEY (the reference, e.g. test/acc) with --signals or --baseline: "
                                     "the table judges each signal by how well it ranks the runs by the reference.")
            signals = list(args.signals)
            if args.metric is not None or not signals:  # --metric joins the table; alone with --baseline, the default metric
                signals.append(metric + (f"@{layer}" if layer else "") + (f":{args.mode}" if args.mode else ""))
            elif args.layer or args.mode:
                raise SelectionError("Expected --layer and --mode with --metric; in --signals write KEY@deepest, KEY@LAYER, KEY:min, KEY:max.")
            _cli_direction(args.against, args.against_mode)
            res = rank_signals(args.logdir, args.against, signals=signals, baselines=args.baseline, against_mode=args.against_mode,
                               at=args.at, where=args.where, top_k=args.top_k, subset_size=args.subset_size, n_draws=args.draws,
                               n_boot=args.boot, level=args.level, cv=args.cv, seed=args.seed, underfit_below=args.underfit_below,
                               group=args.group, group_by=args.group_by, compare=args.compare, within=args.within,
                               across=args.across)
        else:
            if args.compare:
                raise SelectionError("Expected --compare A,B with the table: name the signals with --signals (e.g. --signals all) "
                                     "and/or --baseline, and --against.")
            mode = args.mode or key_direction(metric)
            if mode is None:
                raise SelectionError(f"--metric {metric} has no known direction: pass --mode max or --mode min.")
            if args.against:
                _cli_direction(args.against, args.against_mode)
            res = rank_runs(args.logdir, metric, mode=mode, at=args.at, against=args.against,
                            against_mode=args.against_mode, top_k=args.top_k, subset_size=args.subset_size,
                            n_draws=args.draws, seed=args.seed, where=args.where, layer=layer, n_boot=args.boot,
                            level=args.level, underfit_below=args.underfit_below, group=args.group, group_by=args.group_by,
                            within=args.within, across=args.across)
    except SelectionError as err:
        print(f"netprobe rank: error: {err}", file=sys.stderr)
        return 2
    try:
        if args.json:
            print(json.dumps(_finite(res), indent=2, default=str, allow_nan=False))
        elif table:
            _print_signals(res, sys.stdout)
        else:
            _print_table(res, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # `netprobe rank ... | head`: the reader has gone; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
