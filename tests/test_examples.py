"""The worked examples run as written, and the libgomp spin setting they rely on."""
import os
import subprocess
import sys
from pathlib import Path

import cbn

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


def _import_cbn_in_child(env):
    code = ("import os, cbn; from cbn import _omp_env; print(_omp_env.setting); "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _environment_without_spin_settings():
    env = dict(os.environ)
    env.pop("GOMP_SPINCOUNT", None)
    env.pop("OMP_WAIT_POLICY", None)
    return env


def test_spin_count_is_set_only_while_cbn_loads_libgomp():
    setting, variables = _import_cbn_in_child(_environment_without_spin_settings())
    if cbn._dispatch.kernels.openmp_enabled():
        assert setting == "GOMP_SPINCOUNT=1000 (cbn's default)"
    assert variables == "None None"  # not left behind for child processes


def test_a_users_spin_setting_is_left_alone():
    env = dict(_environment_without_spin_settings(), OMP_WAIT_POLICY="passive")
    setting, variables = _import_cbn_in_child(env)
    assert setting == "OMP_WAIT_POLICY=passive (from the environment)"
    assert variables == "None passive"
