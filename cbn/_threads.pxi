# Thread count per call: serial below a size where waking a team costs more
# than the work it would share; otherwise cbn.set_num_threads' setting or
# OpenMP's default (OMP_NUM_THREADS), read at call time.

cdef extern from "_omp_compat.h" nogil:
    int cbn_openmp_enabled()
    int cbn_max_threads()


cdef enum:
    SERIAL_BELOW = 1 << 15   # elements: below this a kernel runs serial
    THREAD_CAP = 256         # libgomp exits if it cannot create a team this big

PARALLEL_MIN_ELEMENTS = SERIAL_BELOW
MAX_THREADS = THREAD_CAP

# 0: follow OpenMP's default; set by cbn.set_num_threads.
cdef int configured_threads = 0


def openmp_enabled():
    """True when cbn was compiled with OpenMP."""
    return bool(cbn_openmp_enabled())


def max_threads():
    """OpenMP's default team size (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return cbn_max_threads()


def set_thread_count(int n):
    """0 restores OpenMP's default. The caller validates the range."""
    global configured_threads
    configured_threads = n


cdef inline int team_threads() noexcept nogil:
    """The threads a parallel call uses: the setting, or OpenMP's default."""
    if configured_threads > 0:
        return configured_threads
    return min(cbn_max_threads(), <int>THREAD_CAP)


def thread_count():
    return team_threads()


cdef int threads_for(Py_ssize_t num_elements) noexcept nogil:
    if num_elements < SERIAL_BELOW or not cbn_openmp_enabled():
        return 1
    return team_threads()
