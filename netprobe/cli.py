"""The ``netprobe`` command (also ``python -m netprobe``): a thin layer over :mod:`netprobe.select`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import List, Optional



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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netprobe", description="netprobe: representation signals for training runs.")
    p.add_argument("--version", action="version", version=f"netprobe {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rank", help="rank the runs of a sweep by a logged signal",
                       description="Rank the runs under LOGDIR (TensorBoard event files) by a logged signal, "
                                   "optionally against a reference key (e.g. test accuracy). A run whose event file has a "
                                   "corrupt or truncated record is skipped, with the reason.")
    r.add_argument("logdir")
    r.add_argument("--metric", default="netprobe/reliance_auc", help="signal key (default: netprobe/reliance_auc)")
    r.add_argument("--mode", choices=("max", "min"), default="max", help="is a higher signal better (max) or lower")
    r.add_argument("--at", type=_at, default="last", help="last | best | EPOCH (0-based)")
    r.add_argument("--against", default=None, help="reference key, read at its last value (e.g. test/acc)")
    r.add_argument("--against-mode", choices=("max", "min"), default="max",
                   help="is a higher reference better (max, e.g. accuracy) or lower (min, e.g. loss); "
                        "spearman_rho and kendall_tau are oriented by both modes: positive = agreement")
    r.add_argument("--top-k", type=_ks, default=None,
                   help="k values for the hit rates, each below the subset size (default: those of 1,5,10 below it)")
    r.add_argument("--subset-size", type=int, default=None, help="runs per resampled subset (default: all runs)")
    r.add_argument("--draws", type=int, default=10_000, help="resampled subsets (when --subset-size < runs)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--where", action="append", default=[], metavar="COND",
                   help="keep runs meeting KEY OP NUMBER, e.g. 'netprobe/probe_accuracy>=0.99' (repeatable)")
    r.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    return p


def _fmt(v, nd=4):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


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


def _print_table(res, out) -> None:
    hp_keys = sorted({k for r in res["runs"] for k in r["hparams"]})
    head = ["rank", "run"] + hp_keys + [res["metric"]] + ([res["against"], "ref rank"] if res["against"] else [])
    rows = [[str(r["rank"]), r["run"]] + [_fmt(r["hparams"].get(k)) for k in hp_keys] + [_fmt(r["signal"])]
            + ([_fmt(r["reference"]), _fmt(r.get("reference_rank"), 1)] if res["against"] else []) for r in res["runs"]]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=out)
    for s in res["skipped"]:
        print(f"skipped  {s['run']}: {s['reason']}", file=out)
    where = f" where {' and '.join(res['where'])}" if res.get("where") else ""
    ties = res.get("pick_ties") or []
    tie_note = f" (tied for the best signal with {', '.join(t for t in ties if t != res['pick'])})" if len(ties) > 1 else ""
    print(f"\n{_plural(len(res['runs']), 'run')} ranked by {res['metric']} ({res['mode']}, at {res['at']}){where}; "
          f"pick: {res['pick']}{tie_note}", file=out)
    if res["against"] and res["runs"]:
        print(f"against {res['against']}: pick's reference rank {_fmt(res['pick_reference_rank'], 1)} of {len(res['runs'])}", file=out)
        if len(res["runs"]) >= 2 and res["spearman_rho"] is None:
            print("spearman_rho and kendall_tau undefined: the signal or the reference is the same for every run", file=out)
        elif res["spearman_rho"] is not None:
            print(f"spearman_rho {res['spearman_rho']:.3f}   kendall_tau {res['kendall_tau']:.3f}"
                  "   (oriented by --mode and --against-mode: positive = the signal prefers the runs the reference prefers)", file=out)
        if res["top_k"]:
            hits = "  ".join(f"top-{k} {p:.2f}" for k, p in res["top_k"].items())
            print(f"hit rates (pick by signal in subsets of {_plural(res['subset_size'], 'run')}, "
                  f"{_plural(res['n_draws'], 'draw')}): {hits}", file=out)


def main(argv: Optional[List[str]] = None) -> int:
    from netprobe.select import SelectionError, rank_runs

    args = build_parser().parse_args(argv)
    try:
        res = rank_runs(args.logdir, args.metric, mode=args.mode, at=args.at, against=args.against,
                        against_mode=args.against_mode, top_k=args.top_k, subset_size=args.subset_size,
                        n_draws=args.draws, seed=args.seed, where=args.where)
    except SelectionError as err:
        print(f"netprobe rank: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_finite(res), indent=2, default=str, allow_nan=False))
    else:
        _print_table(res, sys.stdout)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
