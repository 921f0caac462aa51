"""Thread count used by the compiled kernels."""
import os

from . import _checks
from ._dispatch import kernels

# Below this many elements a kernel runs serial: waking a thread team costs
# more than the work it would share.
PARALLEL_MIN_ELEMENTS = 1 << 15
# A cap well above any CPU cbn targets: asking OpenMP for tens of thousands of
# threads ends the process (libgomp exits when thread creation fails).
MAX_THREADS = 256

_num_threads = None  # None: follow OpenMP's default (OMP_NUM_THREADS)


def set_num_threads(n):
    """Set the number of threads the kernels use; ``None`` restores the default.

    Results do not depend on this number: the kernels split their work by
    shape only and merge partial results in a fixed order.
    """
    global _num_threads
    if n is None:
        _num_threads = None
        return
    n = _checks.integer(n, "set_num_threads(n)")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(
            f"set_num_threads expects a thread count from 1 to {MAX_THREADS}, got {n}"
        )
    _num_threads = n


def get_num_threads():
    """Number of threads the kernels use (OpenMP's default unless set)."""
    if _num_threads is not None:
        return _num_threads
    return min(kernels.max_threads(), MAX_THREADS)


def threads_for(num_elements):
    """Thread count for a kernel call touching ``num_elements`` elements."""
    if num_elements < PARALLEL_MIN_ELEMENTS or not kernels.openmp_enabled():
        return 1
    return get_num_threads()


def _serial_after_fork():
    # libgomp's thread pool does not survive fork(): a child that starts a
    # parallel region hangs. Children of a fork (multiprocessing's default on
    # Linux) therefore run serial unless they call set_num_threads themselves.
    global _num_threads
    _num_threads = 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_serial_after_fork)
