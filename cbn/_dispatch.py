"""Runtime choice of the widest SIMD build of the kernels this CPU runs.

setup.py compiles the same inner kernels (cbn/_kernels_impl.pxi) for the
baseline instruction set and, on x86-64, for AVX2 and AVX-512. They compute
the same bits; the wider ones are faster. ``CBN_SIMD=baseline|avx2|avx512``
forces one (for tests and benchmarks); asking for a build the CPU cannot run
is an error. The chosen build's table goes to the executor, cbn._core, which
is compiled once: ``kernels`` below is that executor.
"""
import importlib
import importlib.util
import os

from . import _core
from . import _kernels as _baseline

BUILDS = {"avx512": "cbn._kernels_avx512", "avx2": "cbn._kernels_avx2",
          "baseline": "cbn._kernels"}


def compiled_targets():
    """The SIMD builds present in this installation, widest first.

    Found without importing them: a module built for AVX-512 may use those
    instructions as soon as it initializes, so importing it on a CPU without
    them dies of SIGILL.
    """
    return [target for target, module in BUILDS.items()
            if importlib.util.find_spec(module) is not None]


def _usable(target):
    return target == "baseline" or _baseline.cpu_supports(target)


def _choose():
    forced = os.environ.get("CBN_SIMD", "").strip().lower()
    if forced:
        if forced not in BUILDS:
            raise ImportError(f"CBN_SIMD={forced!r}: expected one of {sorted(BUILDS)}")
        if forced not in compiled_targets() or not _usable(forced):
            raise ImportError(f"CBN_SIMD={forced!r}: that build is missing or this CPU "
                              "cannot run it")
        return importlib.import_module(BUILDS[forced])
    for target in compiled_targets():
        if _usable(target):
            return importlib.import_module(BUILDS[target])
    return _baseline


build = _choose()
_core.use_kernels(build)
kernels = _core
