# Thread count per call: one thread below a size where sharing the work costs
# more than it saves; otherwise cbn.set_num_threads' setting or the default
# (set by cbn._threads at import), read at call time. The threads are the
# kernels' own pool (_pool.h).


cdef enum:
    SERIAL_BELOW = 1 << 15   # elements: below this a kernel runs on one thread
    THREAD_CAP = 256         # a bound far above the CPUs cbn targets

PARALLEL_MIN_ELEMENTS = SERIAL_BELOW
MAX_THREADS = THREAD_CAP

# 0: the default; set by cbn.set_num_threads.
cdef int configured_threads = 0
cdef int default_threads = 1
# Whether the kernel build in use has its thread pool (set by use_kernels).
cdef bint threads_supported = False


def threads_enabled():
    """True when the kernels in use can run on several threads."""
    return threads_supported


def set_default_threads(int n):
    """The thread count used while none is set. The caller validates it."""
    global default_threads
    default_threads = n


def set_thread_count(int n):
    """0 restores the default. The caller validates the range."""
    global configured_threads
    configured_threads = n


cdef inline int team_threads() noexcept nogil:
    """The threads a parallel call uses: the setting, or the default."""
    if not threads_supported:
        return 1
    if configured_threads > 0:
        return configured_threads
    return default_threads


def thread_count():
    return team_threads()


cdef int threads_for(Py_ssize_t num_elements) noexcept nogil:
    if num_elements < SERIAL_BELOW:
        return 1
    return team_threads()
