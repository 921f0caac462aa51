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


def _size_bytes(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def cache_sizes():
    """{"L1d": bytes, "L2": bytes, "L3": bytes, ...}: the data and unified
    caches of CPU 0 (Linux sysfs); empty where sysfs does not say."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _size_bytes((index / "size").read_text().strip())
        except (OSError, ValueError, IndexError):
            continue
        if kind != "Instruction":
            sizes[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    return dict(sorted(sizes.items()))


def last_level_cache_bytes():
    """Size of the largest cache level of CPU 0 (Linux sysfs), or None."""
    sizes = cache_sizes()
    return sizes[max(sizes, key=lambda name: int(name[1]))] if sizes else None


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
