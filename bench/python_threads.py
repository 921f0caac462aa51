"""Python threads sharing one model: the inference-pipeline case.

A pipeline serving requests from several Python threads calls the same
eval-mode layer (or its frozen form) from all of them. The kernels release
the GIL, so the calls run in parallel; what stays serial is the Python-side
work of each call (about a microsecond). Each row times a fixed batch of
calls made by one thread, then the same calls split between two threads,
each thread writing into its own out= buffer, with cbn's kernels at one
thread each (set_num_threads(1), as a multi-threaded pipeline should run
them).
"""
import threading
import time

import numpy as np

import cbn

from .load import CpuLoad
from .timing import _GcPaused

CALLS = 2000  # calls per sample, shared among the threads


def _wall_seconds(model, xs, outs, threads):
    """Seconds for CALLS calls split among ``threads`` Python threads."""
    barrier = threading.Barrier(threads + 1)

    def worker(k):
        x, out = xs[k], outs[k]
        barrier.wait()
        for _ in range(CALLS // threads):
            model(x, out=out)
        barrier.wait()

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for thread in workers:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    barrier.wait()
    elapsed = time.perf_counter() - start
    for thread in workers:
        thread.join()
    return elapsed


def _model(form, num_features, rng):
    layer = cbn.BatchNorm(num_features)
    layer.weight[...] = rng.uniform(0.5, 2.0, num_features)
    layer.running_var[...] = rng.uniform(0.5, 2.0, num_features)
    layer.eval()
    return layer if form == "layer" else layer.freeze()


def run(cases, samples, cbn_threads=None):
    """One row per (form, shape) of ``cases``: seconds per call with one and
    with two Python threads, and the speed-up."""
    rng = np.random.default_rng(20261123)
    rows = []
    cbn.set_num_threads(1)
    try:
        for form, shape in cases:
            model = _model(form, shape[1], rng)
            xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
            outs = [np.empty_like(x) for x in xs]
            times = {1: [], 2: []}
            load = CpuLoad()
            with _GcPaused():
                _wall_seconds(model, xs, outs, 2)  # warm-up
                for _ in range(samples):
                    for threads in (1, 2):
                        times[threads].append(_wall_seconds(model, xs, outs, threads))
            one, two = (float(np.median(times[n])) / CALLS for n in (1, 2))
            rows.append({"name": f"python threads {form} {'x'.join(map(str, shape))}",
                         "form": form, "shape": list(shape), "seconds": [one, two],
                         "speedup": one / two, "machine_load": load.lap()})
    finally:
        cbn.set_num_threads(cbn_threads)
    return rows
