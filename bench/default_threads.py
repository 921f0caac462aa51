"""cbn's default thread setting against one thread, where users call it.

A default that uses two threads must never make a call slower than one
thread would: on a quiet machine, between the multi-threaded matrix
products of a NumPy pipeline (OpenBLAS's threads may still be spinning when
cbn starts), and while another process keeps a core busy (an OpenMP team
waiting for a descheduled thread loses whole time slices). Each row times
one call (float32, out=) with ``cbn.set_num_threads(None)`` and with
``cbn.set_num_threads(1)``, samples of the two settings alternating round
by round in this process, and gives the ratio of the medians.
"""
import contextlib
import sys

import numpy as np

import cbn

from . import cbn_calls
from .busy import BusyCore
from .cases import OPS
from .load import CpuLoad
from .suite import make_data
from .timing import per_call

SCENARIOS = ("quiet", "between matmuls", "busy core")
LIMIT = 1.10  # default time / one-thread time, at most
# The matrix product between cbn calls in the pipeline scenario: large
# enough that OpenBLAS runs it on all its threads.
MATMUL = (128, 512, 512)


def _matmul(rng):
    """A call computing a fixed matrix product into a preallocated array."""
    m, k, n = MATMUL
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    product = np.empty((m, n), np.float32)
    return lambda: np.matmul(a, b, out=product)


def _context(scenario):
    return BusyCore() if scenario == "busy core" else contextlib.nullcontext()


def name(scenario, case, op):
    return f"default threads {scenario} {case.name} {op}"


def run(cases, samples, sample_seconds, scenarios=SCENARIOS, ops=OPS,
        selected=lambda name: True, cbn_threads=None, progress=sys.stderr):
    """One row per (scenario, case, op): seconds per call at the default
    setting and at one thread, the ratio, and the load while timed."""
    rng = np.random.default_rng(20261201)
    data = {case: make_data(case, rng) for case in cases}
    matmul = _matmul(rng)
    settings = [lambda: cbn.set_num_threads(None), lambda: cbn.set_num_threads(1)]
    rows = []
    try:
        for scenario in scenarios:
            todo = [(case, op) for case in cases for op in ops
                    if op in case.ops and selected(name(scenario, case, op))]
            if not todo:
                continue
            print(f"default threads, {scenario}: {len(todo)} rows", file=progress,
                  flush=True)
            with _context(scenario):
                for case, op in todo:
                    x, dy, params = data[case]
                    call = cbn_calls.call(op, x, dy, params, case.axis, out=np.empty_like(x))
                    load = CpuLoad()
                    default, one = per_call(
                        [call, call], samples, sample_seconds, settings,
                        before_each=matmul if scenario == "between matmuls" else None)
                    rows.append({"name": name(scenario, case, op), "scenario": scenario,
                                 "case": case.name, "shape": list(case.shape),
                                 "layout": case.layout, "op": op,
                                 "default_threads": _default_count(),
                                 "seconds": {"default": default, "1 thread": one},
                                 "ratio": default / one, "machine_load": load.lap()})
    finally:
        cbn.set_num_threads(cbn_threads)
    return rows


def _default_count():
    cbn.set_num_threads(None)
    return cbn.get_num_threads()
