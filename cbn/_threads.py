"""Thread count used by the compiled kernels."""
from __future__ import annotations

import os

from ._convert import integer
from ._dispatch import kernels

# The setting lives in the compiled executor, which reads it at every call.

# Below this many elements a kernel runs serial: waking a thread team costs
# more than the work it would share.
PARALLEL_MIN_ELEMENTS = kernels.PARALLEL_MIN_ELEMENTS
# A cap well above any CPU cbn targets: asking OpenMP for tens of thousands of
# threads ends the process (libgomp exits when thread creation fails).
MAX_THREADS = kernels.MAX_THREADS


def set_num_threads(n: int | None) -> None:
    """Set the number of threads the kernels use; ``None`` restores the default.

    Results do not depend on this number: the kernels split their work by
    shape only and merge partial results in a fixed order.
    """
    if n is None:
        kernels.set_thread_count(0)  # OpenMP's default (OMP_NUM_THREADS)
        return
    n = integer(n, "set_num_threads(n)")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(
            f"set_num_threads expects a thread count from 1 to {MAX_THREADS}, got {n}"
        )
    kernels.set_thread_count(n)


def get_num_threads() -> int:
    """Number of threads the kernels use (OpenMP's default unless set)."""
    return kernels.thread_count()


def _serial_after_fork():
    # libgomp's thread pool does not survive fork(): a child that starts a
    # parallel region hangs. Children of a fork (multiprocessing's default on
    # Linux) therefore run serial unless they call set_num_threads themselves.
    kernels.set_thread_count(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_serial_after_fork)
