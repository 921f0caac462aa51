# The rules about a call's arguments, each written once: eps and momentum,
# per-channel vectors, running buffers, and where an output may be written.
# Plain arguments are accepted in C; anything else is converted by
# cbn._convert and then held to the same rule here.


# -- numbers

cdef double eps_value(object value) except -1.0:
    """eps as a double: a positive finite real number."""
    cdef double v
    if PyFloat_CheckExact(value):
        v = PyFloat_AsDouble(value)
    else:
        value = _convert.real_number(value, "eps")
        v = float(value)
    if not (v > 0 and isfinite(v)):
        raise ValueError(f"eps must be a positive finite number, got {value!r}")
    return v


def check_eps(value):
    """``value`` if it is a valid eps (as given: an int stays an int, so reprs
    read like PyTorch's), else TypeError or ValueError."""
    if not PyFloat_CheckExact(value):
        value = _convert.real_number(value, "eps")
    eps_value(value)
    return value


cpdef object check_momentum(object value, bint allow_none=True):
    """``value`` if it is a valid momentum: a real number in [0, 1], or None
    where the caller allows the cumulative average."""
    cdef double v
    if value is None:
        if not allow_none:
            raise TypeError("momentum must be a number in [0, 1], got None")
        return None
    if PyFloat_CheckExact(value):
        v = PyFloat_AsDouble(value)
        if 0 <= v <= 1:
            return value
    else:
        value = _convert.real_number(value, "momentum")
    if not 0 <= value <= 1:
        raise ValueError(f"momentum must be in [0, 1] (or None), got {value!r}")
    return value


cpdef bint check_training_flag(object training) except -1:
    if training is True or training is False:
        return training
    if isinstance(training, numpy.bool_):
        return bool(training)
    raise TypeError(f"training must be a bool, got {type(training).__name__}")


# -- per-channel vectors

def channel_vector(value, Py_ssize_t num_channels, str name, dtype=numpy.float64,
                   bint copy=True):
    """``value`` as a contiguous (C,) array of ``dtype``: weights, biases,
    statistics. A copy by default, so that it cannot alias an ``out=`` array
    or change under a later in-place edit."""
    array = _convert.real_array(value, name)
    if array.ndim != 1 or array.shape[0] != num_channels:
        raise ValueError(
            f"{name} has shape {array.shape}, expected ({num_channels},) "
            f"for {num_channels} channels"
        )
    if copy:
        return numpy.array(array, dtype=dtype, order="C")
    return numpy.ascontiguousarray(array, dtype=dtype)


cdef str vector_hint(object value, View of):
    """The end of a per-channel vector's wrong-length message: the axis of
    ``of``'s input of the vector's length, if any, as the ``axis=`` the
    caller may have meant."""
    if of is None:
        return ""
    try:
        shape = numpy.shape(value)
    except Exception:
        return ""
    if len(shape) != 1:
        return ""
    hint = axis_hint(of.source.shape, of.axis, shape[0])
    return f" (input of shape {of.source.shape})" + hint if hint else ""


cdef int read_channels(object v, Py_ssize_t C, double* dst, str name,  # OUT dst (C,)
                       double fill=0.0, bint optional=False, View of=None) except -1:
    """A per-channel vector copied into ``dst`` as double; None means ``fill``
    where the vector is optional. ``of``: the call's input, for the hint of
    a wrong length."""
    cdef Py_ssize_t c
    cdef const float* f
    cdef const double* d
    if v is None and optional:
        for c in range(C):
            dst[c] = fill
        return 0
    if not (plain_float_array(v) and cnp.PyArray_NDIM(<cnp.ndarray>v) == 1
            and cnp.PyArray_DIMS(<cnp.ndarray>v)[0] == C):
        try:
            v = channel_vector(v, C, name)
        except ValueError as error:
            raise ValueError(f"{error}{vector_hint(v, of)}") from None
    if cnp.PyArray_TYPE(<cnp.ndarray>v) == cnp.NPY_FLOAT:
        f = <const float*>cnp.PyArray_DATA(<cnp.ndarray>v)
        for c in range(C):
            dst[c] = f[c]
    else:
        d = <const double*>cnp.PyArray_DATA(<cnp.ndarray>v)
        for c in range(C):
            dst[c] = d[c]
    return 0


cdef object running_buffer(object value, Py_ssize_t C, str name, View of=None):
    """A running-statistics array that will be updated in place: ``value``,
    or the ndarray over a DLPack tensor's memory."""
    if (plain_float_array(value) and cnp.PyArray_NDIM(<cnp.ndarray>value) == 1
            and cnp.PyArray_DIMS(<cnp.ndarray>value)[0] == C
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>value)):
        return value
    value = _convert.writable_array(value, name, "updated in place")
    if value.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.shape != (C,):
        raise ValueError(
            f"{name} has shape {value.shape}, expected ({C},) for {C} channels"
            f"{vector_hint(value, of)}"
        )
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>value):
        raise ValueError(f"{name} is read-only and cannot be updated in place")
    return value


cdef void store_channels(object v, const double* src, Py_ssize_t C) noexcept:
    """Write a plain (C,) float32/float64 array."""
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


cdef object store_into(object buffer, const double* src, Py_ssize_t C):
    """Write per-channel values into a running buffer of any float layout."""
    if plain_float_array(buffer):
        store_channels(buffer, src, C)
    else:
        values = numpy.empty(C)
        store_channels(values, src, C)
        buffer[...] = values


# -- where outputs may go

cdef inline char* span_start(object a) noexcept:
    return <char*>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef bint shares_memory(object a, object b) except -1:
    """Whether two arrays may share memory (False unless both are ndarrays:
    other array-likes are copied before anything is written)."""
    if not (cnp.PyArray_Check(a) and cnp.PyArray_Check(b)):
        return False
    if (cnp.PyArray_ISCONTIGUOUS(<cnp.ndarray>a)
            and cnp.PyArray_ISCONTIGUOUS(<cnp.ndarray>b)):
        return not (span_start(a) + cnp.PyArray_NBYTES(<cnp.ndarray>a) <= span_start(b)
                    or span_start(b) + cnp.PyArray_NBYTES(<cnp.ndarray>b) <= span_start(a))
    return bool(numpy.may_share_memory(a, b))


cdef bint same_buffer(object a, object b) noexcept:
    """Two C-contiguous arrays covering exactly the same bytes."""
    return (cnp.PyArray_ISCONTIGUOUS(<cnp.ndarray>a)
            and cnp.PyArray_ISCONTIGUOUS(<cnp.ndarray>b)
            and span_start(a) == span_start(b)
            and cnp.PyArray_NBYTES(<cnp.ndarray>a) == cnp.PyArray_NBYTES(<cnp.ndarray>b))


cdef inline object out_array(object out, str name="out"):
    """``out`` as the ndarray written (a DLPack tensor's memory), or None."""
    if out is None or cnp.PyArray_Check(out):
        return out
    return _convert.writable_array(out, name, "written in place")


cdef int check_not_over_input(object out, View v) except -1:
    """A training forward may not write over its input: backward needs it."""
    if out is not None and shares_memory(out_array(out), v.source):
        raise ValueError(
            "out overlaps the input: a training forward cannot write its output "
            "over its input, since backward needs the input; pass a separate out "
            "array"
        )
    return 0


cdef int output_for(View v, object out, tuple others, str name="out") except -1:
    """Sets ``v``'s output: ``result`` (``out``, or a new array of the input's
    shape and result dtype) and ``kernel``, where the kernels write (the
    kernels' dtype, C-contiguous); they differ for float16, bfloat16 and a
    misaligned ``out``, and finish() converts. ``out`` must match the input
    and overlap each input (the caller's and the kernels' copy, and
    ``others``) wholly or not at all: the kernels are elementwise, so writing
    over the very element just read is safe, but a shifted overlap would read
    written values."""
    cdef cnp.ndarray source = v.source
    kernel_data(v)  # every other check has passed: copy the input if need be
    if out is None:
        if v.converted_dtype is None or v.converted_dtype == v.data.dtype:
            v.result = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(source), cnp.PyArray_DIMS(source),
                                         v.b.typenum, 0)
        else:
            v.result = numpy.empty(v.shape, dtype=v.result_dtype())
    else:
        out = out_array(out, name)
        if not same_dims(<cnp.ndarray>out, source):
            raise ValueError(
                f"{name} has shape {out.shape}, expected the input's shape {v.shape}"
            )
        if out.dtype != v.result_dtype():
            raise TypeError(
                f"{name} has dtype {out.dtype}, expected the input's dtype {v.result_dtype()}"
            )
        if not cnp.PyArray_ISCONTIGUOUS(<cnp.ndarray>out):
            raise ValueError(f"{name} must be C-contiguous")
        if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out):
            raise ValueError(f"{name} is read-only")
        for data in (source, v.data) + others:
            if (data is not None and cnp.PyArray_Check(data) and shares_memory(out, data)
                    and not same_buffer(out, data)):
                raise ValueError(
                    f"{name} partially overlaps an input; pass that input itself for "
                    "an in-place call, or a separate array"
                )
        v.result = out
    v.convert = not (plain_float_array(v.result)
                     and cnp.PyArray_TYPE(<cnp.ndarray>v.result) == v.b.typenum)
    if v.convert:
        v.kernel = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(source), cnp.PyArray_DIMS(source),
                                     v.b.typenum, 0)
    else:
        v.kernel = v.result
    return 0


cdef object finish(View v):
    """The caller's output, converted from the kernels' when they differ."""
    if v.convert:
        v.result[...] = v.kernel.reshape(v.result.shape)
        v.kernel = v.result   # the temporary is not kept
        v.convert = False
    return v.result


# -- masks

cdef bint is_positions_array(object m, View v) noexcept:
    """Whether ``m`` is a C-contiguous bool array of exactly the positions'
    shape (the input's without its channel axis): the usual mask, copied
    and counted in C."""
    cdef int k, ndim = cnp.PyArray_NDIM(<cnp.ndarray>v.source)
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(<cnp.ndarray>v.source)
    cdef cnp.npy_intp* mask_dims
    if (not cnp.PyArray_Check(m) or cnp.PyArray_TYPE(<cnp.ndarray>m) != cnp.NPY_BOOL
            or not cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>m)
            or cnp.PyArray_NDIM(<cnp.ndarray>m) != ndim - 1):
        return False
    mask_dims = cnp.PyArray_DIMS(<cnp.ndarray>m)
    for k in range(ndim - 1):
        if mask_dims[k] != dims[k + (k >= v.axis)]:
            return False
    return True


cdef tuple valid_positions(object mask, View v):
    """``(valid, count)``: ``mask`` (True marks a valid position) as the
    kernels read it, a new C-contiguous uint8 array of one byte per (outer,
    inner) position of ``v``, and how many are valid; ``(None, 0)`` for no
    mask. The mask must be boolean and broadcast to the input's shape without
    its channel axis. A copy: a later change to the caller's mask cannot
    reach a backward."""
    cdef cnp.npy_intp i, n = v.b.outer * v.b.inner, count = 0
    cdef const unsigned char* src
    cdef unsigned char* dst
    if mask is None:
        return None, 0
    if is_positions_array(mask, v):
        valid = cnp.PyArray_EMPTY(1, &n, cnp.NPY_UINT8, 0)
        src = <const unsigned char*>cnp.PyArray_DATA(<cnp.ndarray>mask)
        dst = <unsigned char*>cnp.PyArray_DATA(<cnp.ndarray>valid)
        for i in range(n):   # (a bool array viewed from bytes may hold any nonzero)
            dst[i] = src[i] != 0
            count += dst[i]
        return valid, count
    m = mask if cnp.PyArray_Check(mask) else _convert.to_numpy(mask, "mask")
    if m.dtype != numpy.bool_:
        raise TypeError(
            f"mask must be a boolean array (True marks a valid position), got dtype "
            f"{m.dtype}; convert it with mask.astype(bool) or a comparison"
        )
    shape = v.source.shape
    positions = shape[:v.axis] + shape[v.axis + 1:]
    try:
        spread = numpy.broadcast_to(m, positions)
    except ValueError:
        raise ValueError(
            f"mask has shape {m.shape}, which does not broadcast to {positions}: the "
            f"input's shape {shape} without its channel axis {v.axis}"
        ) from None
    valid = spread.astype(numpy.uint8).reshape(-1)
    return valid, numpy.count_nonzero(valid)
