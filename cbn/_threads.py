"""Thread count used by the compiled kernels, and its threadpoolctl controller."""
from __future__ import annotations

import os

from ._convert import integer
from ._dispatch import kernels

# The setting lives in the compiled executor, which reads it at every call.

# Below this many elements a kernel runs on one thread: sharing the work
# costs more than it saves.
PARALLEL_MIN_ELEMENTS = kernels.PARALLEL_MIN_ELEMENTS
# A bound far above any CPU cbn targets, so that a typo cannot start
# thousands of threads.
MAX_THREADS = kernels.MAX_THREADS


def default_num_threads(environ=os.environ) -> int:
    """The thread count used until set: ``OMP_NUM_THREADS`` (its first value,
    as OpenMP reads it) when set to a positive integer, else the CPUs this
    process may run on."""
    first = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return min(int(first), MAX_THREADS)
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    return max(1, min(available, MAX_THREADS))


def set_num_threads(n: int | None) -> None:
    """Set the number of threads the kernels use; ``None`` restores the default.

    Parameters
    ----------
    n : int or None
        From 1 to 256; None restores the default (``OMP_NUM_THREADS`` when
        set, else the CPUs this process may run on).

    Raises
    ------
    ValueError
        ``n`` outside [1, 256].
    TypeError
        ``n`` is not an integer or None.

    Notes
    -----
    Results do not depend on this number: the kernels split their work by
    shape only and merge partial results in a fixed order. Inside
    ``threadpoolctl.threadpool_limits(k)`` the limit applies instead, and
    this setting is back after the block.
    """
    if n is None:
        kernels.set_thread_count(0)
        return
    n = integer(n, "set_num_threads(n)")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(
            f"set_num_threads expects a thread count from 1 to {MAX_THREADS}, got {n}"
        )
    kernels.set_thread_count(n)


def get_num_threads() -> int:
    """Number of threads the kernels use.

    Returns
    -------
    int
        The default unless :func:`set_num_threads` set another; 1 in a
        build without threads.
    """
    return kernels.thread_count()


kernels.set_default_threads(default_num_threads())


def _register_with_threadpoolctl():
    """Make ``threadpoolctl.threadpool_limits`` and ``threadpool_info`` see
    cbn's threads (user_api "openmp": the API that limits the threads of
    compiled extensions), when threadpoolctl is installed."""
    try:
        import threadpoolctl
    except ImportError:
        return

    class CbnController(threadpoolctl.LibController):
        user_api = "openmp"
        internal_api = "cbn"
        # threadpoolctl finds controllers among the loaded shared libraries:
        # the executor, recognised by a symbol only it exports.
        filename_prefixes = ("_core.",)
        check_symbols = ("cbn_thread_pool_marker",)

        def get_num_threads(self):
            return get_num_threads()

        def set_num_threads(self, num_threads):
            set_num_threads(max(1, min(int(num_threads), MAX_THREADS)))

        def get_version(self):
            from . import __version__
            return __version__

    threadpoolctl.register(CbnController)


_register_with_threadpoolctl()
