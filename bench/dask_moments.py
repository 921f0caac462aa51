"""cbn.dask.moments against reading the same data through Dask.

A float32 NCHW array of SIZE_BYTES (1 GiB; 64 MiB with --quick) is written
block by block to a file in a temporary directory through np.memmap, then
opened as a Dask array (the memmap wrapped with da.from_array) in blocks of
each of BLOCK_BYTES. Per chunking, rounds alternate two passes over the
whole array with Dask's threaded scheduler (as many workers as the run's
threads, cbn's kernels at one thread each inside them, as a multi-threaded
pipeline should run them):

  read      x.sum().compute(): every byte read once, the cheapest pass
  moments   cbn.dask.moments(x): per-channel count, mean and M2

A warm-up round comes first and is not kept, so both passes read the file
from the page cache (memory, not disk) and Dask's scheduler is imported.
Each row reports the medians as GB/s and the ratio moments / read of the
throughputs (1: the moments cost no more than reading the data).
"""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import cbn

from . import load as machine
from .cache import cache_sizes
from .report import mib
from .tables import _table
from .timing import interleaved

CHANNELS, HEIGHT, WIDTH = 32, 32, 32          # 128 KiB per sample
SIZE_BYTES, QUICK_SIZE_BYTES = 1 << 30, 64 << 20
BLOCK_BYTES, QUICK_BLOCK_BYTES = (8 << 20, 64 << 20), (4 << 20,)
REPEATS, QUICK_REPEATS = 5, 3


def row_name(size_bytes, block_bytes):
    return f"dask moments {mib(size_bytes)} float32 blocks of {mib(block_bytes)}"


def missing():
    """Why the part cannot run, or None."""
    try:
        import dask.array  # noqa: F401
    except ImportError:
        return "Dask is not installed (pip install 'cbn[dask]')"
    return None


def write_file(path, samples, rows):
    """An NCHW float32 file of ``samples`` samples, ``rows`` at a time."""
    rng = np.random.default_rng(20261201)
    base = rng.standard_normal((rows, CHANNELS, HEIGHT, WIDTH), dtype=np.float32)
    data = np.memmap(path, np.float32, "w+", shape=(samples, CHANNELS, HEIGHT, WIDTH))
    for start in range(0, samples, rows):
        stop = min(samples, start + rows)
        data[start:stop] = base[:stop - start] + np.float32(start / samples)
    data.flush()
    del data


def run(selected, quick, progress=sys.stderr, *, threads=None, size_bytes=None,
        block_bytes=None, repeats=None):
    """One row per chunking whose name ``selected`` keeps ([] when none);
    rows carry "skipped" instead of times without Dask. ``threads``: Dask's
    workers (default: cbn's thread count)."""
    size_bytes = size_bytes or (QUICK_SIZE_BYTES if quick else SIZE_BYTES)
    chosen = [block for block in block_bytes or (QUICK_BLOCK_BYTES if quick else BLOCK_BYTES)
              if selected(row_name(size_bytes, block))]
    if not chosen:
        return []
    why = missing()
    if why is not None:
        return [{"name": row_name(size_bytes, block), "skipped": why} for block in chosen]
    import dask
    import dask.array as da

    from cbn import dask as cbn_dask

    repeats = repeats or (QUICK_REPEATS if quick else REPEATS)
    threads = threads or cbn.get_num_threads()
    sample_bytes = CHANNELS * HEIGHT * WIDTH * 4
    samples = max(1, size_bytes // sample_bytes)
    shape = (samples, CHANNELS, HEIGHT, WIDTH)
    rows = []
    cbn_threads = cbn.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="cbn-bench-dask-") as folder:
        path = Path(folder) / "data.f32"
        print(f"dask moments: writing {mib(samples * sample_bytes)} to {folder}",
              file=progress, flush=True)
        write_file(path, samples, max(1, min(chosen) // sample_bytes))
        data = np.memmap(path, np.float32, "r", shape=shape)
        cbn.set_num_threads(1)
        try:
            with dask.config.set(scheduler="threads", num_workers=threads):
                for block in chosen:
                    block_rows = max(1, block // sample_bytes)
                    x = da.from_array(data, chunks=(block_rows, -1, -1, -1))
                    print(f"dask moments: blocks of {mib(block)}, {x.numblocks[0]} blocks",
                          file=progress, flush=True)
                    load = machine.CpuLoad()
                    read, moments = interleaved(
                        [lambda x=x: x.sum().compute(), lambda x=x: cbn_dask.moments(x)],
                        repeats)
                    rows.append({
                        "name": row_name(size_bytes, block), "shape": list(shape),
                        "dtype": "float32", "bytes": x.nbytes,
                        "block_bytes": block_rows * sample_bytes, "blocks": x.numblocks[0],
                        "threads": threads, "repeats": repeats,
                        "seconds": {"read": read, "moments": moments},
                        "gb_per_s": {"read": x.nbytes / read / 1e9,
                                     "moments": x.nbytes / moments / 1e9},
                        "ratio": read / moments, "machine_load": load.lap()})
                    del x
        finally:
            cbn.set_num_threads(cbn_threads)
            del data
    return rows


def report(rows):
    """The part's table and its caches line."""
    caches = cache_sizes()
    timed = [row for row in rows if "seconds" in row]
    threads = timed[0]["threads"] if timed else "-"
    lines = ["cbn.dask.moments vs reading the same data through Dask (x.sum()), float32 "
             "NCHW from a memmapped file in the page cache",
             f"    {os.cpu_count()} logical CPUs; caches (per core where private): "
             + (", ".join(f"{name} {mib(size)}" for name, size in caches.items())
                or "unknown"),
             f"    Dask's threaded scheduler, {threads} workers, cbn at one thread each; "
             "medians of rounds alternating the two passes after a warm-up round; "
             "moments/read: the ratio of their GB/s"]
    body = []
    for row in rows:
        if "seconds" not in row:
            body.append([row["name"], row["skipped"], "", "", "", "", ""])
            continue
        body.append([mib(row["bytes"]), str(row["blocks"]), mib(row["block_bytes"]),
                     f"{row['gb_per_s']['read']:.2f}", f"{row['gb_per_s']['moments']:.2f}",
                     f"{row['ratio']:.2f}",
                     "*" if machine.loaded(row["machine_load"]) else ""])
    lines.append(_table(["size", "blocks", "block", "read GB/s", "moments GB/s",
                         "moments/read", ""], body, left=1))
    if any(machine.loaded(row["machine_load"]) for row in timed):
        lines.append("  * timed while other processes or the hypervisor took more than "
                     f"{machine.BUSY_CPUS:g} CPUs")
    return "\n".join(lines)
