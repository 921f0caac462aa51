"""The machine's limit for a memory-bound kernel: a plain copy of the same bytes.

Batch normalization does almost no arithmetic per byte, so no kernel can beat
reading its input and writing its output once: the time of ``np.copyto`` from
the input into a preallocated array of the same size. The copy is split into
contiguous parts, one per thread, run by Python threads (NumPy releases the
GIL for large copies); the benchmark also times a one-thread copy to show the
split one is the faster (where it is not, memory bandwidth is already
saturated by a single core).
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class ParallelCopy:
    """Callable copying ``source`` into ``destination`` with ``threads`` threads.

    The calling thread copies the first part itself; a pool of ``threads - 1``
    workers, started once, copies the others. Call :meth:`close` when done.
    """

    def __init__(self, source, destination, threads=2):
        source = source.reshape(-1)          # both C-contiguous: views, not copies
        destination = destination.reshape(-1)
        bounds = np.linspace(0, source.size, threads + 1).astype(int)
        self._parts = [(destination[lo:hi], source[lo:hi])
                       for lo, hi in zip(bounds[:-1], bounds[1:])]
        self._pool = ThreadPoolExecutor(threads - 1) if threads > 1 else None

    def __call__(self):
        first, *others = self._parts
        futures = [self._pool.submit(np.copyto, *part) for part in others]
        np.copyto(*first)
        for future in futures:
            future.result()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
