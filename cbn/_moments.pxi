# Merges of per-channel moments (count, mean, M2) across batches and
# processes: cbn.Moments, and what cbn.distributed does with the rows every
# rank gathers. One formula (_chan.pxi), applied channel by channel in a
# fixed order, so the same inputs in the same order give the same bits.
#
# A packed row is what a rank sends: [status, count, mean (C), m2 (C)], all
# float64. The status is the rank's input dtype number (0: none), or
# MOMENTS_FAILED when its input was refused; a merge of rows whose dtype
# numbers differ has status MOMENTS_MIXED.

include "_chan.pxi"

cdef double FAILED_C = -1.0
cdef double MIXED_C = -2.0
MOMENTS_FAILED = FAILED_C
MOMENTS_MIXED = MIXED_C


cdef inline void merge_channels(double count_a, double* mean_a, double* m2_a,
                                double count_b, const double* mean_b, const double* m2_b,
                                Py_ssize_t C) noexcept nogil:
    """(mean_a, m2_a) := a followed by b, per channel (chan_merge's bits, its
    weights computed once)."""
    cdef Py_ssize_t c
    cdef double n = count_a + count_b
    if count_b == 0:
        return
    if count_a == 0:
        memcpy(mean_a, mean_b, C * sizeof(double))
        memcpy(m2_a, m2_b, C * sizeof(double))
        return
    cdef double w_mean = count_b / n, w_m2 = count_a * count_b / n
    for c in range(C):
        chan_combine(&mean_a[c], &m2_a[c], mean_b[c], m2_b[c], w_mean, w_m2)


cdef inline double merged_status(double a, double b) noexcept nogil:
    if a == FAILED_C or b == FAILED_C:
        return FAILED_C
    if a < 0 or b < 0 or (a > 0 and b > 0 and a != b):
        return MIXED_C
    return a if a > 0 else b


cdef double* packed_data(object a, Py_ssize_t length, str name) except NULL:
    if not (plain_float_array(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.NPY_DOUBLE
            and cnp.PyArray_SIZE(<cnp.ndarray>a) % length == 0):
        raise ValueError(f"{name} must be a C-contiguous float64 array of rows of "
                         f"{length} values")
    return <double*>cnp.PyArray_DATA(<cnp.ndarray>a)


def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """(count, mean, m2) of moments a followed by b, as new float64 arrays
    (the arrays are float64 (C,) of one length; counts are ints)."""
    mean = numpy.array(mean_a, dtype=numpy.float64, order="C")
    m2 = numpy.array(m2_a, dtype=numpy.float64, order="C")
    cdef Py_ssize_t C = mean.shape[0]
    b_mean = numpy.ascontiguousarray(mean_b, dtype=numpy.float64)
    b_m2 = numpy.ascontiguousarray(m2_b, dtype=numpy.float64)
    if m2.shape != (C,) or b_mean.shape != (C,) or b_m2.shape != (C,):
        raise ValueError("moments to merge must have the same number of channels")
    merge_channels(<double>count_a, <double*>data_of(mean), <double*>data_of(m2),
                   <double>count_b, <const double*>data_of(b_mean),
                   <const double*>data_of(b_m2), C)
    return count_a + count_b, mean, m2


def merge_rows(rows):
    """Packed rows ((P, 2C + 2) float64), merged in row order: (status,
    count, mean, m2), the last two new (C,) arrays. The status is negative
    when a row's is, or when their dtype numbers differ; the moments are
    then meaningless."""
    cdef Py_ssize_t P = rows.shape[0], width = rows.shape[1], C = (width - 2) // 2
    cdef const double* r = packed_data(rows, width, "rows")
    cdef Py_ssize_t k
    cdef double status = 0, count = 0
    mean = numpy.zeros(C)
    m2 = numpy.zeros(C)
    cdef double* mp = <double*>data_of(mean)
    cdef double* qp = <double*>data_of(m2)
    for k in range(P):
        status = merged_status(status, r[k * width])
        merge_channels(count, mp, qp, r[k * width + 1], r + k * width + 2,
                       r + k * width + 2 + C, C)
        count += r[k * width + 1]
    return status, count, mean, m2


def merge_row_pairs(left, right, Py_ssize_t width):
    """right := left followed by right, row by row (packed rows of ``width``
    values): the user-defined MPI operation of cbn.distributed, which MPI
    applies in rank order."""
    cdef const double* a = packed_data(left, width, "left")
    cdef double* b = packed_data(right, width, "right")
    cdef Py_ssize_t k, rows = cnp.PyArray_SIZE(<cnp.ndarray>left) // width
    cdef Py_ssize_t C = (width - 2) // 2
    cdef const double* x
    cdef double* y
    cdef double* merged = <double*>malloc(2 * C * sizeof(double) + 1)
    if merged == NULL:
        raise MemoryError()
    for k in range(rows):
        x = a + k * width
        y = b + k * width
        # left is MPI's input buffer, not to be written: merge into a copy
        memcpy(merged, x + 2, 2 * C * sizeof(double))
        merge_channels(x[1], merged, merged + C, y[1], y + 2, y + 2 + C, C)
        y[0] = merged_status(x[0], y[0])
        y[1] = x[1] + y[1]
        memcpy(y + 2, merged, 2 * C * sizeof(double))
    free(merged)
