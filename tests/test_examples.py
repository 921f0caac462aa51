"""The worked examples run as written, without an OpenMP runtime."""
import os
import shutil
import signal
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


def test_dataset_statistics_example_normalizes_its_dataset(tmp_path):
    pytest.importorskip("dask.array")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "dataset_statistics.py"), "--megabytes", "8",
         "--rows", "32"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gives the bits of layer(block 0): True" in result.stdout
    assert "Normalized: every channel has mean 0 and standard deviation 1." in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()
            if line.split() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == list(range(16))
    for row in rows:   # the data's statistics are near those they were drawn with
        drawn_mean, mean, drawn_std, std = map(float, row[1:5])
        assert abs(mean - drawn_mean) < 0.1 * drawn_std and abs(std / drawn_std - 1) < 0.05


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


def test_sync_training_example_on_two_ranks_matches_one_process(tmp_path):
    pytest.importorskip("mpi4py", reason="the example needs mpi4py (the mpi extra)")
    beside = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(beside) if beside.exists() else shutil.which("mpiexec")
    assert mpiexec, f"mpi4py is installed but there is no mpiexec beside {sys.executable}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CBN_NUM_THREADS", None)
    # a session of its own: on a timeout the whole job goes, never a hang
    process = subprocess.Popen(
        [mpiexec, "-n", "2", sys.executable, str(EXAMPLES / "sync_training.py"), "--steps",
         "3", "--batch", "9"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("mpiexec -n 2 examples/sync_training.py timed out")
    assert process.returncode == 0, stdout + stderr
    assert "on 2 ranks: global batch 9 (rows per rank: 4, 5)" in stdout, stdout
    assert "matches the single-process run" in stdout, stdout
