"""Facts about the run for the report's header: versions, CPU, caches,
threads, build, and the load before the start."""
import contextlib
import io
import os
import platform
import sys
import tempfile

import numpy as np

import cbn

from . import peers, torch_ops
from .cache import cache_sizes, last_level_cache_bytes
from .load import quiet_check


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
                try:
                    returned = show()
                except Exception as error:  # a build in flux must not stop the run
                    returned = f"cbn.show_config() failed: {error!r}"
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        printed = captured.read() + text.getvalue()
    if returned is not None and not printed:
        printed = returned if isinstance(returned, str) else repr(returned)
    return printed.rstrip("\n")


def blas():
    """NumPy's BLAS libraries and their thread counts (threadpoolctl, optional)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [f"{info['internal_api']} {info.get('version') or ''} "
            f"({info['num_threads']} threads)".replace("  ", " ")
            for info in threadpool_info() if info["user_api"] == "blas"]


def describe(threads):
    """A dict of the facts, for the header and the JSON file."""
    return {
        "cbn": cbn.__version__,
        "cbn_path": os.path.dirname(os.path.abspath(cbn.__file__)),
        "numpy": np.__version__,
        "torch": torch_ops.version(),
        "peers": peers.versions(),
        "blas": blas(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_simd": cpu_simd(),
        "logical_cpus": os.cpu_count(),
        "caches": cache_sizes(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "threads": threads,
        "load_before_start": quiet_check(),
        "show_config": show_config(),
    }
