"""Shared by the tests of the examples' stated findings (tests/test_example_findings*.py): run an
example's ``--quick`` mode, load an example as a module, and read its conclusion lines, checking
that each printed verdict is the one its own printed interval and margin give."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NUM = r"[+-]?(?:\d+\.\d+|nan)"
#: "  <claim>: <verdict>   (<mean> [<lo>, <hi>] ..., margin <m>)", the mean optionally after "rho "
LINE = re.compile(rf"^  (?P<claim>.+?): (?P<verdict>yes|no|not resolved at \d+ seeds)   \((?:rho )?(?P<mean>{NUM}) "
                  rf"\[(?P<lo>{NUM}), (?P<hi>{NUM})\].*margin (?P<margin>\d+\.\d+)\)$", re.M)


def run_quick(script, tmp, *extra):
    """``examples/<script> --quick`` at one thread, its logs under ``tmp``; returns its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick", "--logdir", str(tmp / "runs"), *extra],
                         cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "torch threads = 1" in out.stdout
    return out.stdout


def load_example(name):
    """``examples/<name>.py`` as a module (its own imports of ``_common`` resolved)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(EXAMPLES))


def expected_verdict(claim, lo, hi, margin, tol):
    """The verdict the printed interval gives, or None when it sits at a bound to the printed
    precision: an equivalence ("is within +-") is yes inside +-margin and no wholly outside it; any
    other claim is yes above +margin, no below -margin."""
    if " is within +-" in claim or " are within +-" in claim:
        if lo > -margin + tol and hi < margin - tol:
            return "yes"
        if lo > margin + tol or hi < -margin - tol:
            return "no"
        if (lo < -margin - tol or hi > margin + tol) and lo < margin - tol and hi > -margin + tol:
            return "not resolved"
        return None
    if lo > margin + tol:
        return "yes"
    if hi < -margin - tol:
        return "no"
    if lo < margin - tol and hi > -margin + tol:
        return "not resolved"
    return None


def conclusions(stdout):
    """``{claim: verdict}`` of the conclusion lines, each verdict checked against its own interval."""
    found = {m["claim"]: m for m in LINE.finditer(stdout)}
    for claim, m in found.items():
        mean, lo, hi, margin = (float(m[k]) for k in ("mean", "lo", "hi", "margin"))
        if math.isnan(lo) or math.isnan(hi):
            assert m["verdict"].startswith("not resolved"), (claim, m.group(0))
            continue
        assert lo <= mean <= hi, (claim, m.group(0))
        tol = 10.0 ** -len(m["lo"].split(".")[-1])  # printed values are rounded
        expected = expected_verdict(claim, lo, hi, margin, tol)
        if expected is not None:
            assert m["verdict"].startswith(expected), (claim, m.group(0))
    return {claim: m["verdict"] for claim, m in found.items()}
