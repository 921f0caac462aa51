"""Evicting the caches between timed calls of the large cases.

This machine's last-level cache is large (hundreds of MB on some servers), so
an array "well beyond L2" may still sit in L3 after the previous call touched
it, and each call's time would depend on what its predecessor in the round
left behind. Reading a buffer larger than the last-level cache before each
timed call puts every call, and the copy it is compared with, in the same
state: input and output in memory, not in cache, as the copy-limit model
(traffic in copies of the array) assumes.
"""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DEFAULT_BYTES = 64 << 20  # when the cache size cannot be read


def last_level_cache_bytes():
    """Size of the largest cache level of CPU 0 (Linux sysfs), or None."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        sizes[level] = size
    return sizes[max(sizes)] if sizes else None


class CacheFlush:
    """Callable reading a buffer of 1.25x the last-level cache, split over
    ``threads`` threads (NumPy releases the GIL in reductions)."""

    def __init__(self, threads=2):
        self.cache_bytes = last_level_cache_bytes() or DEFAULT_BYTES
        words = int(self.cache_bytes * 1.25) // 8
        buffer = np.ones(words, dtype=np.int64)  # written once: pages are mapped
        bounds = np.linspace(0, words, threads + 1).astype(int)
        self._parts = [buffer[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
        self._pool = ThreadPoolExecutor(threads - 1) if threads > 1 else None

    def __call__(self):
        first, *others = self._parts
        futures = [self._pool.submit(np.bitwise_or.reduce, part) for part in others]
        np.bitwise_or.reduce(first)
        for future in futures:
            future.result()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
        self._parts = []
