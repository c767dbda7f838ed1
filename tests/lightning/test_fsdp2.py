"""FSDP2 on the CPU: Lightning's ModelParallelStrategy with torch's ``fully_shard`` in
``configure_model``, 2 processes over gloo (tests/_helpers/fsdp2_run.py): the three monitors log the
single-process values, also at an odd probe-set size (unequal shards), and a rank that fails
ends the run on every rank instead of leaving the other waiting."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("pytorch_lightning")
HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_helpers")


def _run(tmp_path, *args):
    out = tmp_path / ("_".join(map(str, args)) + ".json")
    subprocess.run([sys.executable, os.path.join(HERE, "fsdp2_run.py"), str(out), *map(str, args)], check=True, timeout=400,
                   cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("num_samples", [64, 63])
def test_fsdp2_values_equal_a_single_process(tmp_path, num_samples):
    sharded = _run(tmp_path, num_samples)
    single = _run(tmp_path, num_samples, "single")
    assert "values" in sharded, sharded
    assert set(sharded["values"]) == set(single["values"]) and len(single["values"]) > 10
    for k, v in single["values"].items():
        assert sharded["values"][k] == pytest.approx(v, abs=1e-6), k


@pytest.mark.slow
def test_a_failing_rank_ends_the_fsdp2_run_on_every_rank(tmp_path):
    result = _run(tmp_path, 63, "fail")  # (the subprocess ends within the timeout: no rank is left waiting)
    assert "error" in result, result
