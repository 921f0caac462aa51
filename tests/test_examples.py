"""The worked examples run as written, without an OpenMP runtime."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_inference_pipeline_example_runs_and_its_four_ways_agree(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "inference_pipeline.py"), "--batches", "3"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "All ways agree (plain, fused, frozen, folded" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()[-3:]]
    assert [row[0] for row in rows] == ["1", "32", "256"]
    assert all(len(row) == 5 and all(float(t) > 0 for t in row[1:]) for row in rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_cbn_loads_no_openmp_runtime():
    # cbn's threads are its own (cbn/_pool.h): an OpenMP runtime loaded by cbn
    # would bring back the spinning threads that slowed NumPy pipelines.
    code = ("import cbn, numpy as np; cbn.batch_norm_forward(np.ones((512, 256), 'f4')); "
            "print(any('libgomp' in line or 'libomp' in line "
            "for line in open('/proc/self/maps')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
