"""Every example runs in smoke mode (tiny sizes), so the examples cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
MARKERS = {  # a line each example prints with its results
    "demo.py": "reliance",
    "quickstart_pytorch.py": "reliance AUC",
    "quickstart_lightning.py": "netprobe/reliance_auc",
    "memorization.py": "per corruption level",
    "early_stopping.py": "reliance stop",
    "hparam_selection.py": "Kendall tau",
    "convergence.py": "bottom-up",
    "importance.py": "conclusions",
}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_smoke(script, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--smoke", "--logdir", str(tmp_path / "runs")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "torch threads = 1" in out.stdout
    assert MARKERS[script] in out.stdout, out.stdout[-3000:]  # its table (or summary) was printed
    if script != "quickstart_pytorch.py":  # the shortest plain-PyTorch use writes no logs, on purpose
        events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
        assert events, f"{script} wrote no TensorBoard logs under --logdir"


@pytest.mark.slow
def test_hparam_selection_interpolate_regime_smoke(tmp_path):
    # the regime where every run trains until it fits: runs that never fit are counted and named
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "hparam_selection.py"), "--smoke", "--regime", "interpolate", "--logdir",
         str(tmp_path / "runs")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "3 of 3 runs did not reach training accuracy 1.0 for 3 epochs within 2 epochs" in out.stdout, out.stdout[-3000:]
    assert "netprobe/noise_auc@deepest" in out.stdout and "within strata" in out.stdout
