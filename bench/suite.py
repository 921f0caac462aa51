"""The suite: each implementation, the peers and the copy limit, per case.

For every case (shape, layout, dtype) one set of arrays is made and every
call of that case is timed in the same rounds: the copy split over threads
and the one-thread copy, then for each op cbn with ``out=``, cbn's default
call, the NumPy formula and PyTorch; for inference also the peer runtimes
(peers.py) and cbn and OpenVINO with a fused ReLU; on cache-resident cases
also cbn with ``out=`` at one thread. Large cases are timed one call at a
time with the caches flushed before each (cache.py); the others many calls
per sample with warm caches (timing.per_call), the thread count set before
each sample outside the clock.
"""
import sys
import time

import numpy as np

import cbn

from . import cbn_calls, copy_limit, numpy_formula, peers, torch_ops
from .cache import CacheFlush
from .load import CpuLoad, describe, loaded
from .timing import interleaved, per_call

IMPLEMENTATIONS = ("cbn_out", "cbn", "numpy", "torch")
ONE_THREAD = "cbn_out_1thread"
# Which cbn call each peer is compared with: the runtimes writing into bound
# buffers with cbn(out=), those allocating their output with cbn's default call.
PEER_BASELINE = {"onnxruntime": "cbn_out", "openvino": "cbn_out", "onednn": "cbn",
                 "openvino_relu": "cbn_relu_out"}


def make_data(case, rng):
    """(x, dy, params) for ``case``: x with mean about 3 and std about 2."""
    x = rng.standard_normal(case.shape, dtype=case.dtype)
    x *= 2
    x += 3
    dy = rng.standard_normal(case.shape, dtype=case.dtype)

    def vector(mean, spread):
        return (mean + spread * rng.random(case.channels)).astype(case.dtype)

    params = cbn_calls.Params(weight=vector(0.5, 1), bias=vector(-0.5, 1),
                              running_mean=vector(2.5, 1), running_var=vector(3.5, 1))
    return x, dy, params


def _peer_calls(case, x, params, threads):
    """({name: call}, {name: reason}) of the peers and the fused-ReLU pair."""
    expected = cbn_calls.call("inference", x, None, params, case.axis)()
    calls, unsupported = peers.eval_calls(x, params, case.axis, threads, expected)
    relu_out = np.empty_like(x)
    calls["cbn_relu_out"] = cbn_calls.call("inference", x, None, params, case.axis,
                                           out=relu_out, activation="relu")
    relu_expected = np.maximum(expected, 0)
    relu_calls, relu_unsupported = peers.eval_calls(x, params, case.axis, threads,
                                                    relu_expected, relu=True)
    calls.update({f"{key}_relu": call for key, call in relu_calls.items()})
    unsupported.update({f"{key}_relu": reason for key, reason in relu_unsupported.items()})
    return calls, unsupported


def _calls(case, ops, threads, rng):
    """{(name, op or None): call} for one case, and {peer name: reason}."""
    x, dy, params = make_data(case, rng)
    out = np.empty_like(x)
    copy_destination = np.empty_like(x)
    modules = {"cbn": cbn_calls, "numpy": numpy_formula}
    if torch_ops.torch is not None:
        modules["torch"] = torch_ops
    calls = {("copy_split", None): copy_limit.ParallelCopy(x, copy_destination,
                                                          threads=max(2, threads)),
             ("copy_1thread", None): lambda: np.copyto(copy_destination, x)}
    unsupported = {}
    for op in ops:
        calls["cbn_out", op] = cbn_calls.call(op, x, dy, params, case.axis, out=out)
        if case.resident:
            calls[ONE_THREAD, op] = cbn_calls.call(op, x, dy, params, case.axis, out=out)
        for implementation, module in modules.items():
            calls[implementation, op] = module.call(op, x, dy, params, case.axis)
        if op == "inference":
            peer_calls, unsupported = _peer_calls(case, x, params, threads)
            calls.update({(name, op): call for name, call in peer_calls.items()})
    return calls, unsupported


def time_case(case, ops, repeats, samples, threads, cbn_threads, rng, flush=None):
    """({op: {name: median seconds}}, {peer name: reason it is n/a}).

    ``cbn_threads``: the run's cbn.set_num_threads setting (None: default),
    restored before every sample but those of the one-thread variant.
    ``flush`` (a cache.CacheFlush) runs before every timed call of a large case.
    """
    calls, unsupported = _calls(case, ops, threads, rng)
    try:
        if case.large:
            medians = interleaved(list(calls.values()), repeats, flush)
        else:
            setups = [(lambda: cbn.set_num_threads(1)) if name == ONE_THREAD
                      else (lambda: cbn.set_num_threads(cbn_threads)) for name, _ in calls]
            medians = per_call(list(calls.values()), *samples, setups)
    finally:
        cbn.set_num_threads(cbn_threads)
        calls["copy_split", None].close()
    medians = dict(zip(calls, medians))
    copies = {name: medians[name, None] for name in ("copy_split", "copy_1thread")}
    return {op: dict(copies, **{name: seconds for (name, of), seconds in medians.items()
                                if of == op})
            for op in ops}, unsupported


def run(cases, ops_of, repeats, samples, threads, cbn_threads=None, progress=sys.stderr):
    """Time every case; returns one row dict per (case, op).

    ``ops_of(case)`` gives the ops to time for a case (after filtering);
    ``samples`` is (samples, seconds per sample) for the cases timed per call.
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
            times, unsupported = time_case(case, ops, repeats, samples, threads,
                                           cbn_threads, rng, flush)
            load = cpu_load.lap()
            for op in ops:
                rows.append(dict(_row(case, op, times[op],
                                      unsupported if op == "inference" else {}),
                                 machine_load=load))
            print(f"[{index:2d}/{len(todo)}] {case.name} ({case.nbytes / 2**20:.1f} MiB, "
                  f"{case.size_class}): {len(ops)} ops in {time.perf_counter() - start:.1f} s"
                  + ("; LOADED: " + describe(load) if loaded(load) else ""),
                  file=progress, flush=True)
    finally:
        if flush is not None:
            flush.close()
    return rows


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _row(case, op, seconds, unsupported):
    # The limit is the faster copy: the split one on large arrays (unless one
    # core already saturates memory), the one-thread one on small arrays,
    # where handing work to a Python thread costs more than it saves.
    seconds = dict(seconds, copy=min(seconds["copy_split"], seconds["copy_1thread"]))
    for name in IMPLEMENTATIONS:
        seconds.setdefault(name, None)
    return {
        "name": f"{case.name} {op}", "case": case.name,
        "shape": list(case.shape), "layout": case.layout, "axis": case.axis,
        "dtype": case.dtype_name, "op": op, "nbytes": case.nbytes,
        "size_class": case.size_class, "large": case.large, "resident": case.resident,
        "seconds": seconds,
        "speedup_numpy": _ratio(seconds["numpy"], seconds["cbn"]),
        "speedup_torch": _ratio(seconds["torch"], seconds["cbn"]),
        "speedup_peers": {name: _ratio(seconds[name], seconds[baseline])
                          for name, baseline in PEER_BASELINE.items() if name in seconds},
        "unsupported": unsupported,
        "copy_ratio": _ratio(seconds["cbn_out"], seconds["copy"]),
        # At one thread the copy is a plain np.copyto, also one thread.
        "copy_ratio_1thread": _ratio(seconds.get(ONE_THREAD), seconds["copy_1thread"]),
        "copy_split_speedup": _ratio(seconds["copy_1thread"], seconds["copy_split"]),
    }
