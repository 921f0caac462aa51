"""Thread scaling: cbn at 1 and at 2 threads on cache-resident arrays.

The arrays fit in the L2 caches, so memory bandwidth does not cap the
speed-up and a second thread should nearly halve the time. Calls use
``out=`` (no fresh pages), many calls per sample. The same rows check that
results are bit-identical at both thread counts.
"""
import numpy as np

import cbn

from . import cbn_calls
from .cases import SCALING_THREADS, scaling_name
from .load import CpuLoad
from .suite import make_data
from .timing import per_call


def _results(call, threads):
    """Copies of every array the call returns, at ``threads`` threads."""
    cbn.set_num_threads(threads)
    result = call()
    return [np.array(a, copy=True) for a in (result if isinstance(result, tuple) else (result,))]


def run(cases_ops, samples, sample_seconds, cbn_threads=None):
    """One row per (case, op) of ``cases_ops``: seconds per call at each thread
    count of SCALING_THREADS, and whether the results were bit-identical."""
    rng = np.random.default_rng(20261124)
    rows = []
    try:
        for case, ops in cases_ops:
            x, dy, params = make_data(case, rng)
            out = np.empty_like(x)
            for op in ops:
                # A fresh set of calls (and running statistics) per check.
                checks = [_results(cbn_calls.call(op, x, dy, params, case.axis, out=out), n)
                          for n in SCALING_THREADS]
                identical = all(np.array_equal(a, b, equal_nan=True)
                                for other in checks[1:]
                                for a, b in zip(checks[0], other))
                call = cbn_calls.call(op, x, dy, params, case.axis, out=out)
                setups = [lambda n=n: cbn.set_num_threads(n) for n in SCALING_THREADS]
                load = CpuLoad()
                seconds = per_call([call] * len(setups), samples, sample_seconds, setups)
                rows.append({
                    "name": scaling_name(case, op), "shape": list(case.shape),
                    "layout": case.layout, "dtype": case.dtype_name, "op": op,
                    "threads": list(SCALING_THREADS), "seconds": seconds,
                    "speedup": seconds[0] / seconds[-1],
                    "identical": identical, "machine_load": load.lap(),
                })
    finally:
        cbn.set_num_threads(cbn_threads)
    return rows
