"""Thread count used by the compiled kernels."""
import operator

from . import _kernels

# Below this many elements a kernel runs serial: waking a thread team costs
# more than the work it would share.
PARALLEL_MIN_ELEMENTS = 1 << 15

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
    if isinstance(n, bool):
        raise TypeError("set_num_threads expects an integer, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(
            f"set_num_threads expects an integer, got {type(n).__name__}"
        ) from None
    if n < 1:
        raise ValueError(f"set_num_threads expects a positive thread count, got {n}")
    _num_threads = n


def get_num_threads():
    """Number of threads the kernels use (OpenMP's default unless set)."""
    if _num_threads is not None:
        return _num_threads
    return _kernels.max_threads()


def threads_for(num_elements):
    """Thread count for a kernel call touching ``num_elements`` elements."""
    if num_elements < PARALLEL_MIN_ELEMENTS or not _kernels.openmp_enabled():
        return 1
    return get_num_threads()
