"""The large cases: each implementation and the copy limit, timed interleaved.

For every case (shape, layout, dtype) one set of arrays is made, and all
timed calls of that case run in the same rounds: the copy split over threads
and the one-thread copy, then for each op cbn with ``out=``, cbn's default call,
the NumPy formula and PyTorch. On large arrays the caches are flushed before
every timed call (see cache.py).
"""
import sys
import time

import numpy as np

from . import cbn_calls, copy_limit, numpy_formula, torch_ops
from .cache import CacheFlush
from .environment import CpuLoad
from .timing import interleaved

IMPLEMENTATIONS = ("cbn_out", "cbn", "numpy", "torch")


def make_data(case, rng):
    """(x, dy, params) for ``case``: x with mean about 3 and std about 2."""
    x = rng.standard_normal(case.shape, dtype=case.dtype)
    x *= 2
    x += 3
    dy = rng.standard_normal(case.shape, dtype=case.dtype)
    channels = case.shape[case.axis]

    def vector(mean, spread):
        return (mean + spread * rng.random(channels)).astype(case.dtype)

    params = cbn_calls.Params(weight=vector(0.5, 1), bias=vector(-0.5, 1),
                              running_mean=vector(2.5, 1), running_var=vector(3.5, 1))
    return x, dy, params


def time_case(case, ops, repeats, threads, rng, flush=None):
    """{op: {implementation, "copy_split" or "copy_1thread": median seconds}}.

    ``ops``: the ops to time (a subset of cases.OPS); PyTorch is timed when
    installed, otherwise its entry is None. ``flush`` (a cache.CacheFlush)
    runs before every timed call of a large case.
    """
    x, dy, params = make_data(case, rng)
    out = np.empty_like(x)
    copy_destination = np.empty_like(x)
    modules = {"cbn": cbn_calls, "numpy": numpy_formula}
    if torch_ops.torch is not None:
        modules["torch"] = torch_ops
    calls = {}
    for op in ops:
        calls["cbn_out", op] = cbn_calls.call(op, x, dy, params, case.axis, out=out)
        for implementation, module in modules.items():
            calls[implementation, op] = module.call(op, x, dy, params, case.axis)
    split_copy = copy_limit.ParallelCopy(x, copy_destination, threads=max(2, threads))
    try:
        names = [("copy_split", None), ("copy_1thread", None)] + list(calls)
        functions = ([split_copy, lambda: np.copyto(copy_destination, x)]
                     + list(calls.values()))
        medians = dict(zip(names, interleaved(functions, repeats,
                                              flush if case.large else None)))
    finally:
        split_copy.close()
    return {op: {"copy_split": medians["copy_split", None],
                 "copy_1thread": medians["copy_1thread", None],
                 **{implementation: medians.get((implementation, op))
                    for implementation in IMPLEMENTATIONS}}
            for op in ops}


def run(cases, ops_of, repeats, threads, progress=sys.stderr):
    """Time every case; returns one row dict per (case, op).

    ``ops_of(case)`` gives the ops to time for a case (after filtering).
    """
    rng = np.random.default_rng(20261122)
    rows = []
    todo = [(case, ops_of(case)) for case in cases]
    todo = [(case, ops) for case, ops in todo if ops]
    flush = CacheFlush(max(2, threads)) if any(case.large for case, _ in todo) else None
    try:
        for index, (case, ops) in enumerate(todo, 1):
            start = time.perf_counter()
            cpu_load = CpuLoad()
            times = time_case(case, ops, repeats, threads, rng, flush)
            load = cpu_load.lap()
            for op in ops:
                rows.append(dict(_row(case, op, times[op]), machine_load=load))
            print(f"[{index:2d}/{len(todo)}] {case.name} ({case.nbytes / 2**20:.0f} MiB): "
                  f"{len(ops)} ops in {time.perf_counter() - start:.1f} s"
                  + (f"; other processes {load['other_cpus']:.2f} CPUs, hypervisor "
                     f"{load['steal_cpus']:.2f}" if load and load["seconds"] >= 1 else ""),
                  file=progress, flush=True)
    finally:
        if flush is not None:
            flush.close()
    return rows


def _row(case, op, seconds):
    def ratio(a, b):
        return None if a is None or b is None else a / b

    # The limit is the faster copy: the split one on large arrays (unless one
    # core already saturates memory), the one-thread one on small arrays,
    # where handing work to a Python thread costs more than it saves.
    seconds = dict(seconds, copy=min(seconds["copy_split"], seconds["copy_1thread"]))
    return {
        "name": f"{case.name} {op}", "case": case.name,
        "shape": list(case.shape), "layout": case.layout, "axis": case.axis,
        "dtype": case.dtype_name, "op": op, "nbytes": case.nbytes,
        "large": case.large,
        "seconds": seconds,
        "speedup_numpy": ratio(seconds["numpy"], seconds["cbn"]),
        "speedup_torch": ratio(seconds["torch"], seconds["cbn"]),
        "copy_ratio": ratio(seconds["cbn_out"], seconds["copy"]),
        "copy_split_speedup": ratio(seconds["copy_1thread"], seconds["copy_split"]),
    }
