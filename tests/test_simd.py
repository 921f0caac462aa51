"""The SIMD builds of the kernels compute the same bits, and dispatch works."""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

import cbn
from cbn import _dispatch

from corpus import make_input

USABLE = [t for t in _dispatch.compiled_targets() if _dispatch._usable(t)]
LAYOUTS = [((4096, 96), 1), ((64, 16, 16, 16), 1), ((8, 24, 24, 64), -1),
           ((3, 2, 70000), 1), ((7, 5, 3), 1), ((300, 33), 1), ((5, 3, 31), 1),
           ((40, 24, 300), 1)]


def all_results(x, dy, axis):
    """Every kernel's results on x, through the public functions (statistics,
    training and eval forwards with a fused ReLU or not, both backwards)."""
    num_channels = x.shape[axis]
    weight, bias = np.full(num_channels, 1.3), np.full(num_channels, 0.5)
    mean, var = cbn.batch_stats(x.astype(np.float64), axis=axis)
    results = [mean, var]
    for relu in (None, "relu"):
        running_mean, running_var = np.zeros(num_channels), np.ones(num_channels)
        results.append(cbn.batch_norm(x, running_mean, running_var, weight, bias,
                                      training=True, axis=axis, activation=relu))
        results += [running_mean, running_var]
        results.append(cbn.batch_norm(x, mean, var, weight, bias, axis=axis,
                                      activation=relu))
    y, save_mean, save_invstd = cbn.batch_norm_forward(x, weight, bias, axis=axis)
    results += [y, save_mean, save_invstd]
    for training in (True, False):
        results += cbn.batch_norm_backward(dy, x, save_mean, save_invstd, weight,
                                           axis=axis, training=training)
    # masked statistics: a random mask and a padded one (rows valid up to a point)
    positions = np.delete(np.array(x.shape), axis % x.ndim)
    index = np.arange(positions.prod()).reshape(positions)
    for mask in ((index * 7919) % 5 < 3, (index % positions[-1]) < positions[-1] * 2 // 3):
        mask.flat[:2] = True
        results += cbn.batch_stats(x.astype(np.float64), axis=axis, mask=mask)
        y, save_mean, save_invstd = cbn.batch_norm_forward(x, weight, bias, axis=axis,
                                                           mask=mask)
        results += [y, save_mean, save_invstd]
        results += cbn.batch_norm_backward(dy, x, save_mean, save_invstd, weight,
                                           axis=axis, mask=mask)
    return results


def results_with(target, x, dy, axis):
    """all_results() computed by the kernels of one SIMD build."""
    module = importlib.import_module(_dispatch.BUILDS[target])
    _dispatch.kernels.use_kernels(module)
    try:
        assert _dispatch.kernels.simd_target() == target
        cbn.set_num_threads(2)
        return all_results(x, dy, axis)
    finally:
        cbn.set_num_threads(None)
        _dispatch.kernels.use_kernels(_dispatch.build)


def test_the_baseline_build_is_always_there():
    assert "baseline" in _dispatch.compiled_targets()
    assert _dispatch.kernels.simd_target() in USABLE


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_every_usable_build_gives_identical_bits(rng, shape, axis, dtype):
    if len(USABLE) < 2:
        pytest.skip("only one SIMD build runs on this CPU")
    x = make_input(rng, shape, axis, dtype, offset=100.0)
    dy = rng.standard_normal(shape).astype(dtype)
    results = {target: results_with(target, x, dy, axis) for target in USABLE}
    baseline = results["baseline"]
    for target, arrays in results.items():
        for got, expected in zip(arrays, baseline):
            assert got.tobytes() == expected.tobytes(), target


def test_builds_this_cpu_cannot_run_are_never_imported():
    # Importing a build for wider instructions than the CPU has can die of
    # SIGILL in its module initialization, so dispatch must not even try.
    code = ("import sys, cbn; from cbn import _dispatch; "
            "print(*[t for t, m in _dispatch.BUILDS.items() if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), env=dict(os.environ, CBN_SIMD=""))
    assert out.returncode == 0, out.stderr
    imported = set(out.stdout.split())
    assert imported <= set(USABLE) and "baseline" in imported


@pytest.mark.parametrize("target", USABLE)
def test_cbn_simd_forces_a_build(target):
    out = subprocess.run(
        [sys.executable, "-c",
         "from cbn import _dispatch; print(_dispatch.kernels.simd_target())"],
        env=dict(os.environ, CBN_SIMD=target), capture_output=True, text=True,
        cwd=os.path.dirname(__file__))
    assert out.stdout.strip() == target, out.stderr


def test_cbn_simd_rejects_unknown_builds():
    out = subprocess.run([sys.executable, "-c", "import cbn"],
                         env=dict(os.environ, CBN_SIMD="sse9"), capture_output=True,
                         text=True, cwd=os.path.dirname(__file__))
    assert out.returncode != 0 and "sse9" in out.stderr


def test_show_config_names_the_build_in_use(capsys):
    cbn.show_config()
    printed = capsys.readouterr().out
    assert f"SIMD build in use: {_dispatch.kernels.simd_target()}" in printed
    assert "thread pool: on" in printed or "thread pool: off" in printed
