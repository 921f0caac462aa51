"""Where SyncBatchNorm's added time goes at a small shape: each piece of a
training step timed alone between barriers, medians over repeats.

    mpiexec -n 2 python -m mpi4py bench/sync_pieces.py [--channels 256] [--rows 32]

Rank 0 prints: the local BatchNorm's forward and backward, SyncBatchNorm's
over COMM_SELF (no other rank: cbn's own cost) and over COMM_WORLD, and
MPICH's bare Allgather and Allreduce of the sizes SyncBatchNorm sends.
"""
import argparse
import time

import numpy as np
from mpi4py import MPI

import cbn


def median_us(comm, call, repeats):
    times = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3000)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    cbn.set_num_threads(1)
    C, size = args.channels, comm.Get_size()
    x = np.random.default_rng(comm.Get_rank()).standard_normal((args.rows, C), np.float32)
    dy = np.ones_like(x)
    y, dx = np.empty_like(x), np.empty_like(x)
    layers = {"local": cbn.BatchNorm(C),
              "SyncBatchNorm over COMM_SELF": cbn.SyncBatchNorm(C, comm=MPI.COMM_SELF),
              f"SyncBatchNorm over {size} ranks": cbn.SyncBatchNorm(C, comm=comm)}
    rows = []
    for name, layer in layers.items():
        forward = median_us(comm, lambda layer=layer: layer(x, out=y), args.repeats)
        backward = median_us(comm, lambda layer=layer: layer.backward(dy, out=dx),
                             args.repeats)
        rows.append((f"{name}: forward / backward", f"{forward:.1f} / {backward:.1f}"))
    packed, gathered = np.zeros(2 * C + 2), np.empty((size, 2 * C + 2))
    sums, total = np.zeros(2 * C + 1), np.empty(2 * C + 1)
    allgather = median_us(comm, lambda: comm.Allgather(packed, gathered), args.repeats)
    allreduce = median_us(comm, lambda: comm.Allreduce(sums, total), args.repeats)
    rows.append((f"MPI Allgather of {2 * C + 2} / Allreduce of {2 * C + 1} doubles",
                 f"{allgather:.1f} / {allreduce:.1f}"))
    if comm.Get_rank() == 0:
        print(f"({args.rows}, {C}) float32, {size} ranks, one thread each; medians of "
              f"{args.repeats}, in microseconds")
        for name, value in rows:
            print(f"  {name:55s} {value}")


if __name__ == "__main__":
    main()
