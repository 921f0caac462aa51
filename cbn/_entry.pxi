# Fast entry points: the common call, validated and run entirely in C.
#
# Design: a small call (a (1, 64) batch in an inference pipeline) costs far
# more in Python-level checks, memoryview set-up and small NumPy temporaries
# than in arithmetic. These entry points take the caller's objects as they are
# and handle only the plain case: exact NumPy arrays of float32/float64 in
# native byte order, aligned and C-contiguous, Python numbers for eps and
# momentum, and an ``out`` that is absent, the input itself or disjoint from
# every input. For anything else (other array types, dtypes or layouts, bad
# values) they return None before touching any state, and the Python layer
# takes its general path, which converts what it can and raises the errors.
#
# Both paths compute the same bits: they run the same whole-step kernels
# (forward_impl, backward_impl); only the running-statistics update is written
# twice, here and as NumPy in cbn/functional.py, in the same order.

cimport numpy as cnp
from cpython.float cimport PyFloat_AsDouble, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongAndOverflow, PyLong_CheckExact
from libc.math cimport isfinite

cnp.import_array()


cdef enum:
    SERIAL_BELOW = 1 << 15   # elements: below this a kernel runs serial
    THREAD_CAP = 256         # libgomp exits if it cannot create a team this big

PARALLEL_MIN_ELEMENTS = SERIAL_BELOW
MAX_THREADS = THREAD_CAP

# 0: follow OpenMP's default (OMP_NUM_THREADS); set by cbn.set_num_threads.
cdef int configured_threads = 0


def set_thread_count(int n):
    """0 restores OpenMP's default. The caller validates the range."""
    global configured_threads
    configured_threads = n


def thread_count():
    if configured_threads > 0:
        return configured_threads
    return min(cbn_max_threads(), <int>THREAD_CAP)


cdef int threads_for_c(Py_ssize_t num_elements) noexcept nogil:
    if num_elements < SERIAL_BELOW or not cbn_openmp_enabled():
        return 1
    if configured_threads > 0:
        return configured_threads
    return min(cbn_max_threads(), <int>THREAD_CAP)


def threads_for(Py_ssize_t num_elements):
    """Thread count for a kernel call touching ``num_elements`` elements."""
    return threads_for_c(num_elements)


# ---------------------------------------------------------------------------
# Recognizing the plain case

cdef struct Block:
    # An input seen as (outer, C, inner), see _kernels_impl.pxi.
    Py_ssize_t outer
    Py_ssize_t C
    Py_ssize_t inner
    int typenum


cdef inline bint plain_float_array(object a) noexcept:
    """An exact ndarray of float32/float64, native byte order, aligned and
    C-contiguous (the layout the kernels read directly)."""
    cdef int typenum
    if not cnp.PyArray_CheckExact(a):
        return False
    typenum = cnp.PyArray_TYPE(<cnp.ndarray>a)
    return ((typenum == cnp.NPY_FLOAT or typenum == cnp.NPY_DOUBLE)
            and cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>a)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a))


cdef bint plain_input(object x, object axis, int min_ndim, int max_ndim,
                      Block* block) noexcept:
    """True, with ``block`` filled in, when ``x`` and ``axis`` are the plain case."""
    cdef int ndim, k, overflow = 0
    cdef long ax
    cdef cnp.npy_intp* dims
    if not plain_float_array(x) or not PyLong_CheckExact(axis):
        return False
    ndim = cnp.PyArray_NDIM(<cnp.ndarray>x)
    if ndim < min_ndim or ndim > max_ndim:
        return False
    ax = PyLong_AsLongAndOverflow(axis, &overflow)
    if overflow:  # beyond a C long: the general path reports it
        return False
    if ax < -ndim or ax >= ndim:
        return False
    if ax < 0:
        ax += ndim
    dims = cnp.PyArray_DIMS(<cnp.ndarray>x)
    block.outer = 1
    block.inner = 1
    for k in range(ax):
        block.outer *= dims[k]
    for k in range(ax + 1, ndim):
        block.inner *= dims[k]
    block.C = dims[ax]
    block.typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    return True


cdef bint read_channels(object v, Py_ssize_t C, double fill,
                        double* dst) noexcept:   # OUT (C,)
    """A per-channel vector (or None, meaning ``fill``) copied into ``dst`` as
    double; False when it is not a plain (C,) float array."""
    cdef Py_ssize_t c
    cdef const float* f
    cdef const double* d
    if v is None:
        for c in range(C):
            dst[c] = fill
        return True
    if (not plain_float_array(v) or cnp.PyArray_NDIM(<cnp.ndarray>v) != 1
            or cnp.PyArray_DIMS(<cnp.ndarray>v)[0] != C):
        return False
    if cnp.PyArray_TYPE(<cnp.ndarray>v) == cnp.NPY_FLOAT:
        f = <const float*>cnp.PyArray_DATA(<cnp.ndarray>v)
        for c in range(C):
            dst[c] = f[c]
    else:
        d = <const double*>cnp.PyArray_DATA(<cnp.ndarray>v)
        for c in range(C):
            dst[c] = d[c]
    return True


cdef bint writable_channels(object v, Py_ssize_t C) noexcept:
    """A plain (C,) float array that can be updated in place."""
    return (plain_float_array(v) and cnp.PyArray_NDIM(<cnp.ndarray>v) == 1
            and cnp.PyArray_DIMS(<cnp.ndarray>v)[0] == C
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>v))


cdef void store_channels(object v, const double* src, Py_ssize_t C) noexcept:
    """Write a per-channel vector checked by writable_channels()."""
    cdef Py_ssize_t c
    cdef float* f
    cdef double* d
    if cnp.PyArray_TYPE(<cnp.ndarray>v) == cnp.NPY_FLOAT:
        f = <float*>cnp.PyArray_DATA(<cnp.ndarray>v)
        for c in range(C):
            f[c] = <float>src[c]
    else:
        d = <double*>cnp.PyArray_DATA(<cnp.ndarray>v)
        for c in range(C):
            d[c] = src[c]


cdef bint plain_number(object v, double low, double high, bint low_open,
                       double* value) noexcept:
    """An exact Python float or int within [low, high] ((low, high] when
    low_open), finite."""
    cdef int overflow = 0
    cdef long integer
    if PyFloat_CheckExact(v):
        value[0] = PyFloat_AsDouble(v)
    elif PyLong_CheckExact(v):
        integer = PyLong_AsLongAndOverflow(v, &overflow)
        if overflow:  # out of any range cbn accepts anyway
            return False
        value[0] = <double>integer
    else:
        return False
    if not isfinite(value[0]) or value[0] > high or value[0] < low:
        return False
    return not (low_open and value[0] == low)


cdef inline char* span_start(object a) noexcept:
    return <char*>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline bint disjoint(object a, object b) noexcept:
    return (span_start(a) + cnp.PyArray_NBYTES(<cnp.ndarray>a) <= span_start(b)
            or span_start(b) + cnp.PyArray_NBYTES(<cnp.ndarray>b) <= span_start(a))


cdef object plain_output(object out, cnp.ndarray x, object also_read,
                         object no_overlap):
    """The array to write: a new one like ``x``, or ``out`` when it matches
    ``x`` and is ``x`` itself (or ``also_read``) or disjoint from them and from
    ``no_overlap``; None otherwise (the general path checks and reports)."""
    cdef int k
    if out is None:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x),
                                 cnp.PyArray_TYPE(x), 0)
    if (not plain_float_array(out) or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out)
            or cnp.PyArray_TYPE(<cnp.ndarray>out) != cnp.PyArray_TYPE(x)
            or cnp.PyArray_NDIM(<cnp.ndarray>out) != cnp.PyArray_NDIM(x)):
        return None
    for k in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIMS(<cnp.ndarray>out)[k] != cnp.PyArray_DIMS(x)[k]:
            return None
    for source in (x, also_read):
        if (source is not None and span_start(out) != span_start(source)
                and not disjoint(out, source)):
            return None
    for source in no_overlap:
        if source is not None and not disjoint(out, source):
            return None
    return out


def shares_memory(a, b):
    """Whether two NumPy arrays may share memory (False when either is not an
    ndarray: cbn copies other array-likes before writing anything)."""
    if not (cnp.PyArray_Check(a) and cnp.PyArray_Check(b)):
        return False
    if plain_float_array(a) and plain_float_array(b):
        return not disjoint(a, b)
    return bool(numpy.may_share_memory(a, b))


# ---------------------------------------------------------------------------
# The computations, on checked arguments

cdef enum:
    # Rows of the per-channel scratch of a forward call
    S_MEAN, S_VAR, S_INVSTD, S_WEIGHT, S_BIAS, S_RUNNING_MEAN, S_RUNNING_VAR, S_ROWS


cdef int forward_kernels(const void* xp, void* yp, Block b, double eps,
                         bint batch_stats, bint relu, double* s,
                         int threads) noexcept nogil:
    """forward_impl on the rows of ``s`` for the block's dtype."""
    cdef Py_ssize_t C = b.C
    if b.typenum == cnp.NPY_FLOAT:
        return forward_impl(<const float*>xp, b.outer, C, b.inner, s + S_WEIGHT * C,
                            s + S_BIAS * C, eps, batch_stats, s + S_MEAN * C,
                            s + S_VAR * C, s + S_INVSTD * C, <float*>yp, relu, threads)
    return forward_impl(<const double*>xp, b.outer, C, b.inner, s + S_WEIGHT * C,
                        s + S_BIAS * C, eps, batch_stats, s + S_MEAN * C,
                        s + S_VAR * C, s + S_INVSTD * C, <double*>yp, relu, threads)


cdef enum:
    # What a layer does with batch statistics that are not finite
    NONFINITE_PROPAGATE = 0   # into the running statistics, as PyTorch
    NONFINITE_RAISE = 1       # FloatingPointError before any state changes
    NONFINITE_SKIP = 2        # those channels' running statistics stay as they were

NONFINITE_MODES = {"propagate": NONFINITE_PROPAGATE, "raise": NONFINITE_RAISE,
                   "skip": NONFINITE_SKIP}


cdef inline bint finite_stats(const double* mean, const double* var,
                              Py_ssize_t c) noexcept nogil:
    return isfinite(mean[c]) and isfinite(var[c])


def nonfinite_error(channels):
    """The FloatingPointError of nonfinite="raise" for these channels."""
    shown = list(channels[:20]) + (["..."] if len(channels) > 20 else [])
    return FloatingPointError(
        f"batch statistics are not finite in {len(channels)} channel(s) "
        f"{shown} (NaN or inf in the input); nonfinite='raise': nothing was updated"
    )


cdef void running_update(double* running_mean, double* running_var,
                         const double* mean, const double* var, Py_ssize_t C,
                         Py_ssize_t n, double factor, bint skip_nonfinite) noexcept nogil:
    """In place, as functional._update_running: PyTorch's update with the
    unbiased batch variance; with skip_nonfinite, channels whose statistics
    are not finite keep their running values."""
    cdef Py_ssize_t c
    cdef double correction = <double>n / (n - 1)
    for c in range(C):
        if skip_nonfinite and not finite_stats(mean, var, c):
            continue
        running_mean[c] = (1.0 - factor) * running_mean[c] + factor * mean[c]
        running_var[c] = (1.0 - factor) * running_var[c] + factor * (var[c] * correction)


cdef object plain_forward(cnp.ndarray x, Block b, object weight, object bias,
                          object running_mean, object running_var, double eps,
                          bint batch_stats, bint update, double factor, bint relu,
                          int nonfinite, object out, object save_mean,
                          object save_invstd, object save_weight):
    """y, or None when an argument is not the plain case. With ``update`` the
    running statistics are updated in place; the save_* arrays (plain float64
    (C,) or None) receive what backward needs."""
    cdef Py_ssize_t C = b.C, n = b.outer * b.inner
    cdef double* s
    cdef double* running = NULL
    cdef int status
    cdef const void* xp
    cdef void* yp
    if n == 0 or C == 0 or (batch_stats and n == 1):
        return None  # empty batches, no channels, single values: the general path's rules
    if update and not (batch_stats and writable_channels(running_mean, C)
                       and writable_channels(running_var, C)):
        return None
    s = <double*>malloc(S_ROWS * C * sizeof(double))
    if s == NULL:
        return None
    try:
        if not (read_channels(weight, C, 1.0, s + S_WEIGHT * C)
                and read_channels(bias, C, 0.0, s + S_BIAS * C)):
            return None
        if not batch_stats and not (
                read_channels(running_mean, C, 0.0, s + S_MEAN * C)
                and read_channels(running_var, C, 0.0, s + S_VAR * C)):
            return None
        if update:
            running = s + S_RUNNING_MEAN * C  # and the running var's row after it
            read_channels(running_mean, C, 0.0, running)
            read_channels(running_var, C, 0.0, running + C)
        y = plain_output(out, x, None,
                         (running_mean, running_var) if update else ())
        if y is None:
            return None
        xp = cnp.PyArray_DATA(x)
        yp = cnp.PyArray_DATA(<cnp.ndarray>y)
        with nogil:
            status = forward_kernels(xp, yp, b, eps, batch_stats, relu, s,
                                     threads_for_c(n * C))
        check_scratch(status)
        if batch_stats and nonfinite == NONFINITE_RAISE:
            bad = [c for c in range(C) if not finite_stats(s + S_MEAN * C, s + S_VAR * C, c)]
            if bad:
                raise nonfinite_error(bad)
        if update:
            running_update(running, running + C, s + S_MEAN * C, s + S_VAR * C,
                           C, n, factor, nonfinite == NONFINITE_SKIP)
            store_channels(running_mean, running, C)
            store_channels(running_var, running + C, C)
        if save_mean is not None:
            store_channels(save_mean, s + S_MEAN * C, C)
            store_channels(save_invstd, s + S_INVSTD * C, C)
        if save_weight is not None:
            store_channels(save_weight, s + S_WEIGHT * C, C)
        return y
    finally:
        free(s)


cdef enum:
    # Rows of the per-channel scratch of a backward call
    B_MEAN, B_INVSTD, B_WEIGHT, B_SUM_DY, B_DOTP, B_GRAD_WEIGHT, B_ROWS


cdef int backward_kernels(const void* dyp, const void* xp, void* dxp, Block b,
                          bint training, double* s, int threads) noexcept nogil:
    """backward_impl on the rows of ``s`` for the block's dtype, then
    grad_weight = dotp * invstd (as functional._backward)."""
    cdef Py_ssize_t c, C = b.C
    cdef int status
    if b.typenum == cnp.NPY_FLOAT:
        status = backward_impl(<const float*>dyp, <const float*>xp, b.outer, C, b.inner,
                               s + B_MEAN * C, s + B_INVSTD * C, s + B_WEIGHT * C,
                               training, s + B_SUM_DY * C, s + B_DOTP * C,
                               <float*>dxp, threads)
    else:
        status = backward_impl(<const double*>dyp, <const double*>xp, b.outer, C,
                               b.inner, s + B_MEAN * C, s + B_INVSTD * C,
                               s + B_WEIGHT * C, training, s + B_SUM_DY * C,
                               s + B_DOTP * C, <double*>dxp, threads)
    for c in range(C):
        s[B_GRAD_WEIGHT * C + c] = s[B_DOTP * C + c] * s[B_INVSTD * C + c]
    return status


cdef bint same_layout(object a, cnp.ndarray x) noexcept:
    """``a`` is a plain float array of x's dtype and shape."""
    cdef int k
    if (not plain_float_array(a) or cnp.PyArray_TYPE(<cnp.ndarray>a) != cnp.PyArray_TYPE(x)
            or cnp.PyArray_NDIM(<cnp.ndarray>a) != cnp.PyArray_NDIM(x)):
        return False
    for k in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIMS(<cnp.ndarray>a)[k] != cnp.PyArray_DIMS(x)[k]:
            return False
    return True


cdef object plain_backward(cnp.ndarray dy, cnp.ndarray x, Block b, object save_mean,
                           object save_invstd, object weight, bint training,
                           object out, int grad_typenum, object relu_output):
    """(dx, grad_weight, grad_bias), or None when an argument is not the plain
    case. ``relu_output``: the output of a forward with a fused ReLU, whose
    clipped places get no gradient (None: no ReLU). The masked gradient is
    made in the output array, which may then not be x or that output."""
    cdef Py_ssize_t C = b.C, n = b.outer * b.inner
    cdef double* s
    cdef int status
    cdef const void* dyp = cnp.PyArray_DATA(dy)
    cdef const void* xp = cnp.PyArray_DATA(x)
    cdef const void* yp = NULL
    cdef void* dxp
    if n == 0 or C == 0 or not same_layout(dy, x):
        return None
    if relu_output is not None:
        if not same_layout(relu_output, x) or (out is not None and (
                not plain_float_array(out) or span_start(out) == span_start(x))):
            return None
        yp = cnp.PyArray_DATA(<cnp.ndarray>relu_output)
    s = <double*>malloc(B_ROWS * C * sizeof(double))
    if s == NULL:
        return None
    try:
        if not (save_mean is not None and save_invstd is not None
                and read_channels(save_mean, C, 0.0, s + B_MEAN * C)
                and read_channels(save_invstd, C, 0.0, s + B_INVSTD * C)
                and read_channels(weight, C, 1.0, s + B_WEIGHT * C)):
            return None
        dx = plain_output(out, x, dy, (relu_output,))
        if dx is None:
            return None
        grad_weight = cnp.PyArray_EMPTY(1, <cnp.npy_intp*>&C, grad_typenum, 0)
        grad_bias = cnp.PyArray_EMPTY(1, <cnp.npy_intp*>&C, grad_typenum, 0)
        dxp = cnp.PyArray_DATA(<cnp.ndarray>dx)
        with nogil:
            if yp != NULL:  # the masked gradient goes in dx, the backward reads it there
                if b.typenum == cnp.NPY_FLOAT:
                    relu_grad_impl(<const float*>dyp, <const float*>yp, <float*>dxp,
                                   n * C, threads_for_c(n * C))
                else:
                    relu_grad_impl(<const double*>dyp, <const double*>yp, <double*>dxp,
                                   n * C, threads_for_c(n * C))
                dyp = dxp
            status = backward_kernels(dyp, xp, dxp, b, training, s, threads_for_c(n * C))
        check_scratch(status)
        store_channels(grad_weight, s + B_GRAD_WEIGHT * C, C)
        store_channels(grad_bias, s + B_SUM_DY * C, C)
        return dx, grad_weight, grad_bias
    finally:
        free(s)


# ---------------------------------------------------------------------------
# Entry points (each returns None for the general path to take over)

def fast_batch_norm(x, running_mean, running_var, weight, bias, training,
                    momentum, eps, axis, out, bint relu):
    """cbn.batch_norm for the plain case (relu: the activation is "relu")."""
    cdef Block b
    cdef double eps_c, momentum_c = 0
    cdef bint has_running = running_mean is not None and running_var is not None
    if (training is not True and training is not False) or not plain_input(
            x, axis, 2, 64, &b):
        return None
    if not plain_number(eps, 0.0, 1e308, True, &eps_c):
        return None
    if momentum is not None and not plain_number(momentum, 0.0, 1.0, False,
                                                 &momentum_c):
        return None
    if training:
        if has_running and momentum is None:
            return None
        if not has_running and (running_mean is not None or running_var is not None):
            return None
        return plain_forward(x, b, weight, bias, running_mean, running_var, eps_c,
                             True, has_running, momentum_c, relu, NONFINITE_PROPAGATE,
                             out, None, None, None)
    if not has_running:
        return None
    return plain_forward(x, b, weight, bias, running_mean, running_var, eps_c, False,
                         False, 0.0, relu, NONFINITE_PROPAGATE, out, None, None, None)


def fast_batch_norm_forward(x, weight, bias, eps, axis, out):
    """cbn.batch_norm_forward for the plain case: (y, save_mean, save_invstd)."""
    cdef Block b
    cdef double eps_c
    if not plain_input(x, axis, 2, 64, &b) or not plain_number(eps, 0.0, 1e308,
                                                               True, &eps_c):
        return None
    save_mean = cnp.PyArray_EMPTY(1, <cnp.npy_intp*>&b.C, cnp.NPY_DOUBLE, 0)
    save_invstd = cnp.PyArray_EMPTY(1, <cnp.npy_intp*>&b.C, cnp.NPY_DOUBLE, 0)
    y = plain_forward(x, b, weight, bias, None, None, eps_c, True, False, 0.0, False,
                      NONFINITE_PROPAGATE, out, save_mean, save_invstd, None)
    if y is None:
        return None
    return y, save_mean, save_invstd


def fast_layer_forward(x, axis, int min_ndim, int max_ndim, Py_ssize_t num_channels,
                       weight, bias, running_mean, running_var, eps,
                       bint batch_stats, bint update, double factor, bint relu,
                       int nonfinite, out, save_mean, save_invstd, save_weight):
    """BatchNorm.forward with batch statistics for the plain case. The layer's
    hyper-parameters are already valid; save_* are its float64 (C,) buffers
    for backward."""
    cdef Block b
    cdef double eps_c
    if (not plain_input(x, axis, min_ndim, max_ndim, &b) or b.C != num_channels
            or not plain_number(eps, 0.0, 1e308, True, &eps_c)):
        return None
    return plain_forward(x, b, weight, bias, running_mean, running_var, eps_c,
                         batch_stats, update, factor, relu, nonfinite, out, save_mean,
                         save_invstd, save_weight)


def fast_backward(dy, x, axis, save_mean, save_invstd, weight, training, out,
                  grad_dtype, relu_output=None):
    """cbn.batch_norm_backward and BatchNorm.backward for the plain case:
    (dx, grad_weight, grad_bias), the gradients in ``grad_dtype`` (None: x's);
    ``relu_output`` as in plain_backward."""
    cdef Block b
    cdef int grad_typenum
    if ((training is not True and training is not False)
            or not plain_input(x, axis, 2, 64, &b) or not plain_float_array(dy)):
        return None
    if grad_dtype is None:
        grad_typenum = b.typenum
    elif grad_dtype is float32_dtype:
        grad_typenum = cnp.NPY_FLOAT
    elif grad_dtype is float64_dtype:
        grad_typenum = cnp.NPY_DOUBLE
    else:
        return None
    return plain_backward(dy, x, b, save_mean, save_invstd, weight, training, out,
                          grad_typenum, relu_output)


import numpy
float32_dtype = numpy.dtype(numpy.float32)
float64_dtype = numpy.dtype(numpy.float64)
