"""Facts about the run for the report's header: versions, CPU, threads, build."""
import contextlib
import io
import os
import platform
import sys
import tempfile
import time

import numpy as np

import cbn

from . import torch_ops
from .cache import last_level_cache_bytes


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo on Linux, else platform)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_simd():
    """The SIMD extensions the CPU reports that matter to cbn's kernels."""
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl")
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in flags]
    except OSError:
        pass
    return []


def show_config():
    """What ``cbn.show_config()`` prints (or returns), or None if it does not exist.

    Captured at the file-descriptor level too, in case the build facts are
    printed from C.
    """
    show = getattr(cbn, "show_config", None)
    if show is None:
        return None
    text = io.StringIO()
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as captured:
        try:
            os.dup2(captured.fileno(), 1)
            with contextlib.redirect_stdout(text):
                returned = show()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        printed = captured.read() + text.getvalue()
    if returned is not None and not printed:
        printed = returned if isinstance(returned, str) else repr(returned)
    return printed.rstrip("\n")


class CpuLoad:
    """CPU used by other processes, and stolen by the hypervisor, while the
    benchmark runs: the machine's busy time from /proc/stat minus this
    process's own CPU time. :meth:`lap` gives the averages, in CPUs, since the
    last lap; None where /proc/stat does not exist. The kernel counts in ticks
    of 10 ms, so averages over less than a second are rough."""

    def __init__(self):
        self._last = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as stat:
                fields = [int(value) for value in stat.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        ticks = os.sysconf("SC_CLK_TCK")
        own = os.times()
        return (time.perf_counter(), (user + nice + system + irq + softirq) / ticks,
                steal / ticks, own.user + own.system)

    def lap(self):
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None or now[0] <= last[0]:
            return None
        wall, busy, steal, own = (a - b for a, b in zip(now, last))
        return {"other_cpus": max(0.0, (busy - own) / wall), "steal_cpus": steal / wall,
                "seconds": wall}


def quiet_check(seconds=0.5):
    """CPU load of other processes over a short idle wait before the run."""
    load = CpuLoad()
    time.sleep(seconds)
    return load.lap()


def describe(threads):
    """A dict of the facts, for the header and the JSON file."""
    return {
        "cbn": cbn.__version__,
        "cbn_path": os.path.dirname(os.path.abspath(cbn.__file__)),
        "numpy": np.__version__,
        "torch": torch_ops.version(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_simd": cpu_simd(),
        "logical_cpus": os.cpu_count(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "threads": threads,
        "load_before_start": quiet_check(),
        "show_config": show_config(),
    }
