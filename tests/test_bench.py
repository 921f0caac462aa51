"""The benchmark runs: ``bench/run.py --quick`` end to end, once.

No timing assertions (the machines are noisy): only that every case and op
was timed and the report printed. The performance targets are checked by
running the benchmark itself.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OPS = {"train forward", "inference", "backward"}
LAYOUTS = {"NC", "NCL", "NCHW", "NHWC"}
DTYPES = {"float32", "float64"}


def _installed(module):
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "results.json"
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--json", str(path),
         "--plot", str(path.with_suffix(".png"))],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout, json.loads(path.read_text()), path.with_suffix(".png")


def _positive(value):
    return isinstance(value, float) and value > 0


def test_every_case_and_op_is_timed(quick_run):
    _, results, _ = quick_run
    rows = results["suite"]
    assert {row["layout"] for row in rows} == LAYOUTS
    assert {row["dtype"] for row in rows} == DTYPES
    ops_per_case = {}
    for row in rows:
        ops_per_case.setdefault(row["case"], set()).add(row["op"])
    assert all(ops == OPS for ops in ops_per_case.values()), ops_per_case
    assert len(rows) == 3 * len(ops_per_case)
    torch_timed = _installed("torch")
    for row in rows:
        seconds = row["seconds"]
        for key in ("cbn_out", "cbn", "numpy", "copy", "copy_split", "copy_1thread"):
            assert _positive(seconds[key]), (row["name"], key)
        assert _positive(seconds["torch"]) if torch_timed else seconds["torch"] is None
        assert _positive(row["speedup_numpy"]) and _positive(row["copy_ratio"])


def test_small_calls_and_thread_scaling_are_timed(quick_run):
    _, results, _ = quick_run
    small = results["small_calls"]
    assert {(row["form"], row["op"]) for row in small} >= {
        ("layer", "inference"), ("function", "inference"),
        ("function", "train forward"), ("function", "backward")}
    for row in small:
        assert _positive(row["seconds"]["cbn"]) and _positive(row["seconds"]["numpy"])
    scaling = results["thread_scaling"]
    assert {row["op"] for row in scaling} == OPS
    for row in scaling:
        assert all(_positive(seconds) for seconds in row["seconds"])
        assert isinstance(row["identical"], bool)
    shared = results["python_threads"]
    assert shared and {row["form"] for row in shared} <= {"layer", "frozen"}
    for row in shared:
        assert all(_positive(seconds) for seconds in row["seconds"])
        assert row["speedup"] == row["seconds"][0] / row["seconds"][1]


def test_targets_are_judged(quick_run):
    _, results, _ = quick_run
    statuses = {target["status"] for target in results["targets"]
                if target["kind"] == "target"}
    assert statuses <= {"PASS", "FAIL", "SKIP"}
    assert set(results["summary"]) == OPS


def test_report_is_printed(quick_run):
    stdout, results, _ = quick_run
    assert f"cbn {results['facts']['cbn']}" in stdout
    assert "cbn(out=)" in stdout and "xNumPy" in stdout and "out=/copy" in stdout
    for row in results["suite"]:
        assert str(tuple(row["shape"])) in stdout
    assert "Small calls" in stdout and "Thread scaling" in stdout
    assert "Python threads sharing one eval layer" in stdout
    assert "Targets" in stdout and "targets met" in stdout


def test_chart_only_with_matplotlib(quick_run):
    _, _, chart = quick_run
    if _installed("matplotlib"):
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not chart.exists()


def test_runs_without_torch_and_matplotlib(tmp_path):
    # Both optional: block their imports and run a few rows.
    path = tmp_path / "results.json"
    # `python -c` puts the working directory (the repo root) first on sys.path;
    # drop it so the installed cbn is imported, as `python bench/run.py` does.
    script = ("import runpy, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
              "sys.modules['torch'] = None; "
              "sys.modules['matplotlib'] = None; "
              "sys.argv = ['bench/run.py', '--quick', '--filter', 'NHWC float64', "
              f"'--json', {str(path)!r}, '--plot', {str(tmp_path / 'chart.png')!r}]; "
              "runpy.run_path('bench/run.py', run_name='__main__')")
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "PyTorch is not installed" in completed.stdout
    results = json.loads(path.read_text())
    assert results["suite"] and all(row["seconds"]["torch"] is None
                                    for row in results["suite"])
    assert not (tmp_path / "chart.png").exists()
