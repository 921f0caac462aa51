# Inference with per-channel parameters computed once.
#
# Design: an inference call is y = (x - mean) * scale + bias per channel (then
# ReLU), where mean is the running mean and scale = invstd * weight with
# invstd = 1 / sqrt(running_var + eps): exactly what forward_impl computes in
# eval mode, so the cached parameters give the same bits as every other eval
# path. ChannelParams holds them, built once and never changed afterwards: a
# call that runs without the GIL may still be reading one after its layer has
# moved on to a new one (the call holds a reference to it meanwhile).
#
# EvalCache gives a BatchNorm layer the ChannelParams of its current weight,
# bias, running statistics and eps. A layer's arrays can be edited in place
# through any reference, so changes are detected by content: the cache keeps
# a copy of their bytes and compares it on each call (memcmp of 4 * C values,
# cheaper than rebuilding, and it cannot miss an edit: the parameters and the
# snapshot are built from one copy of the arrays). A call that races with a
# write from another thread may use either the old or the new values; the
# next call sees the new ones.

from libc.string cimport memcmp, memcpy


cdef class ChannelParams:
    """Float64 per-channel parameters of an inference call, as read-only (C,)
    arrays: ``mean``, ``invstd``, ``weight``, ``bias`` and
    ``scale = invstd * weight``. Built from float64 arrays of one length,
    copied."""

    cdef readonly object mean, invstd, weight, bias, scale
    cdef readonly Py_ssize_t num_channels
    cdef const double* mean_p
    cdef const double* invstd_p
    cdef const double* weight_p
    cdef const double* scale_p
    cdef const double* bias_p

    def __init__(self, mean, invstd, weight, bias):
        cdef Py_ssize_t c
        cdef double* sc
        cdef const double* inv
        cdef const double* w
        if self.mean is not None:  # calls without the GIL may be reading them
            raise TypeError("ChannelParams cannot be changed once built")
        arrays = [numpy.array(a, dtype=numpy.float64, order="C")
                  for a in (mean, invstd, weight, bias)]
        if any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
            raise ValueError("ChannelParams: mean, invstd, weight and bias must be 1D "
                             f"and of one length, got {[a.shape for a in arrays]}")
        self.mean, self.invstd, self.weight, self.bias = arrays
        self.num_channels = self.mean.shape[0]
        self.scale = numpy.empty(self.num_channels)
        sc = <double*>cnp.PyArray_DATA(<cnp.ndarray>self.scale)
        inv = <const double*>cnp.PyArray_DATA(<cnp.ndarray>self.invstd)
        w = <const double*>cnp.PyArray_DATA(<cnp.ndarray>self.weight)
        for c in range(self.num_channels):
            sc[c] = inv[c] * w[c]
        for a in (self.mean, self.invstd, self.weight, self.bias, self.scale):
            a.flags.writeable = False
        self.mean_p = <const double*>cnp.PyArray_DATA(<cnp.ndarray>self.mean)
        self.invstd_p = inv
        self.weight_p = w
        self.scale_p = sc
        self.bias_p = <const double*>cnp.PyArray_DATA(<cnp.ndarray>self.bias)

    def scale_shift(self, dtype):
        """The computation as ``x * scale + shift``, in ``dtype``:
        scale = weight / sqrt(running_var + eps), shift = bias - mean * scale."""
        shift = self.bias - self.mean * self.scale
        return self.scale.astype(dtype), shift.astype(dtype)


def inference_params(weight, bias, running_mean, running_var, double eps):
    """The ChannelParams of plain (C,) float32/float64 arrays (weight and bias
    may be None: 1 and 0), with invstd = 1 / sqrt(running_var + eps)."""
    cdef Py_ssize_t c, C
    cdef double* inv
    if (not plain_float_array(running_mean)
            or cnp.PyArray_NDIM(<cnp.ndarray>running_mean) != 1):
        raise TypeError("running_mean must be a contiguous 1D float32/float64 array")
    C = cnp.PyArray_DIMS(<cnp.ndarray>running_mean)[0]
    if running_var is None:
        raise TypeError("running_var is required with running_mean")
    mean, var, w, b = [numpy.empty(C) for _ in range(4)]
    read_channels(running_mean, C, <double*>cnp.PyArray_DATA(mean), "running_mean")
    read_channels(running_var, C, <double*>cnp.PyArray_DATA(var), "running_var")
    read_channels(weight, C, <double*>cnp.PyArray_DATA(w), "weight", 1.0, True)
    read_channels(bias, C, <double*>cnp.PyArray_DATA(b), "bias", 0.0, True)
    inv = <double*>cnp.PyArray_DATA(var)
    for c in range(C):  # in place: var becomes invstd
        inv[c] = 1.0 / sqrt(inv[c] + eps)
    return ChannelParams(mean, var, w, b)


cdef class EvalCache:
    """The ChannelParams of a layer's current parameters, rebuilt only when
    weight, bias, running_mean, running_var or eps changed."""

    cdef char* snapshot       # their bytes when ``params`` was built, in that order
    cdef Py_ssize_t nbytes
    cdef int present          # bit k: the k-th of the four arrays was not None
    cdef double eps
    cdef ChannelParams params

    def __dealloc__(self):
        free(self.snapshot)

    cdef bint unchanged(self, tuple arrays, int present, double eps) noexcept:
        cdef Py_ssize_t offset = 0, size
        if self.params is None or present != self.present or eps != self.eps:
            return False
        for a in arrays:
            if a is None:
                continue
            if not plain_float_array(a):
                return False
            size = cnp.PyArray_NBYTES(<cnp.ndarray>a)
            if (offset + size > self.nbytes
                    or memcmp(self.snapshot + offset, cnp.PyArray_DATA(<cnp.ndarray>a),
                              size) != 0):
                return False
            offset += size
        return offset == self.nbytes

    def current(self, weight, bias, running_mean, running_var, double eps):
        """The ChannelParams of these arrays and eps, cached or rebuilt."""
        cdef tuple arrays = (weight, bias, running_mean, running_var)
        cdef int k, present = 0
        cdef Py_ssize_t offset = 0, total = 0
        cdef char* snapshot
        for k in range(4):
            if arrays[k] is not None:
                present |= 1 << k
        if self.unchanged(arrays, present, eps):
            return self.params
        # Copy first, then build the parameters from the copies and snapshot
        # them: another thread may write the arrays between two reads (NumPy
        # copies release the GIL), never the copies, so parameters and snapshot
        # always agree; a torn copy only differs from the arrays, and the next
        # call rebuilds.
        arrays = tuple(None if a is None else numpy.array(a, copy=True) for a in arrays)
        params = inference_params(*arrays, eps)
        for a in arrays:
            if a is not None:
                total += cnp.PyArray_NBYTES(<cnp.ndarray>a)
        snapshot = <char*>malloc(total if total > 0 else 1)
        if snapshot == NULL:
            raise MemoryError()
        for a in arrays:
            if a is not None:
                memcpy(snapshot + offset, cnp.PyArray_DATA(<cnp.ndarray>a),
                       cnp.PyArray_NBYTES(<cnp.ndarray>a))
                offset += cnp.PyArray_NBYTES(<cnp.ndarray>a)
        free(self.snapshot)
        self.snapshot = snapshot
        self.nbytes = total
        self.present = present
        self.eps = eps
        self.params = params
        return params

    def clear(self):
        """Forget the cached parameters (the next lookup rebuilds them)."""
        self.params = None
