"""One rank of the SyncBatchNorm benchmark (bench/sync.py launches it):

    mpiexec -n 2 python -m mpi4py bench/sync_worker.py '{"shapes": [[32, 256]], ...}'

Every rank holds its own float32 batch of each shape (N rows per rank) and
times, one thread per rank, a training step (forward + backward, into
preallocated outputs) of a local cbn.BatchNorm and of a cbn.SyncBatchNorm
per reduction path, interleaved repeat by repeat. Before each timed step
all ranks meet at a barrier; each rank times its step alone, and a repeat's
time is the slowest rank's, since a data-parallel step waits for the
slowest. Rank 0 prints {"rows": [...]} as JSON on its last line: per shape,
the median over repeats of each variant.
"""
import sys
from pathlib import Path

# Run as a script, bench/ itself is first on sys.path: drop it, so that its
# modules (timing.py, cache.py, ...) cannot shadow anything imported below.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import gc
import json
import time

import numpy as np
from mpi4py import MPI

import cbn

MIN_REPEATS = 10


def variants(channels, reductions, comm):
    """{name: layer}: the local layer first, then one synchronized per path."""
    layers = {"local": cbn.BatchNorm(channels)}
    for reduction in reductions:
        layers[reduction] = cbn.SyncBatchNorm(channels, comm=comm, reduction=reduction)
    return layers


def timed_round(comm, layers, x, dy, y, dx, repeats):
    """(variants, repeats) seconds of this rank's steps, the variants
    interleaved repeat by repeat, each step after a barrier."""
    times = np.empty((len(layers), repeats))
    for repeat in range(repeats):
        for index, layer in enumerate(layers.values()):
            comm.Barrier()
            start = time.perf_counter()
            layer(x, out=y)
            layer.backward(dy, out=dx)
            times[index, repeat] = time.perf_counter() - start
    return times


def measure_shape(comm, shape, reductions, repeats, warmup, budget):
    """{variant: median seconds of the slowest rank's step} for one shape:
    ``repeats`` timed repeats after ``warmup``, fewer (at least MIN_REPEATS)
    when the warm-up says they would take more than ``budget`` seconds (with
    more ranks than cores, a step can take a thousand times longer)."""
    rank = comm.Get_rank()
    rng = np.random.default_rng((20261201, rank))
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    layers = variants(shape[1], reductions, comm)
    names = list(layers)
    enabled = gc.isenabled()
    gc.disable()
    try:
        started = time.perf_counter()
        timed_round(comm, layers, x, dy, y, dx, warmup)
        per_repeat = comm.allreduce((time.perf_counter() - started) / max(warmup, 1),
                                    op=MPI.MAX)
        repeats = max(min(repeats, MIN_REPEATS), min(repeats, int(budget / per_repeat)))
        times = timed_round(comm, layers, x, dy, y, dx, repeats)
    finally:
        if enabled:
            gc.enable()
    slowest = np.empty_like(times)
    comm.Allreduce(times, slowest, op=MPI.MAX)   # per repeat, the slowest rank's
    spread = np.empty_like(times)
    comm.Allreduce(times, spread, op=MPI.MIN)
    return {name: {"median": float(np.median(slowest[k])),
                   "fastest_rank_median": float(np.median(spread[k])),
                   "repeats": repeats}
            for k, name in enumerate(names)}


def main(arguments):
    comm = MPI.COMM_WORLD
    cbn.set_num_threads(1)
    rows = []
    for shape, repeats, warmup in zip(arguments["shapes"], arguments["repeats"],
                                      arguments["warmup"]):
        seconds = measure_shape(comm, tuple(shape), arguments["reductions"], repeats, warmup,
                                arguments["budget_seconds"])
        rows.append({"shape": shape, "seconds": seconds})
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": comm.Get_size(), "threads": cbn.get_num_threads(),
                          "rows": rows}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
