# From an input to the kernels' (outer, C, inner) block: the one entry.
#
# view_of() is the only way an input reaches the kernels, for the layers,
# the frozen layer and the functions alike. It converts once (cbn._convert,
# only for inputs that are not plain) and checks rank, axis and channel count.
# What the kernels cannot read as it is (other layouts, byte orders, float16
# and bfloat16) is copied only by kernel_data(), which the operations call
# after every other check: a huge input of the wrong shape, or with
# per-channel arguments of the wrong length, fails without allocating a copy.

cimport cython


cdef struct Block:
    # An input seen as (outer, C, inner): outer is the product of the
    # dimensions before the channel axis and inner of those after it.
    Py_ssize_t outer
    Py_ssize_t C
    Py_ssize_t inner
    int typenum       # NPY_FLOAT or NPY_DOUBLE: the kernels' dtype


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


cdef class Accepts:
    """What a caller takes as input: its ranks (any rank >= 2 when
    ``ranks_text`` is None), its channel count (-1: any) and its name, for
    the messages."""

    cdef readonly int min_ndim, max_ndim
    cdef readonly object ranks_text
    cdef readonly Py_ssize_t num_channels
    cdef readonly str owner

    def __init__(self, int min_ndim=2, int max_ndim=64, ranks_text=None,
                 Py_ssize_t num_channels=-1, str owner=""):
        self.min_ndim, self.max_ndim = min_ndim, max_ndim
        self.ranks_text = ranks_text
        self.num_channels = num_channels
        self.owner = owner


cdef Accepts ANY_INPUT = Accepts()


@cython.freelist(8)
cdef class View:
    """An input as the kernels read it, with what results are shaped by."""

    cdef object data              # the kernels' array: the caller's, or its copy
    cdef readonly object source   # the caller's input as an ndarray
    cdef object converted_dtype   # results' dtype when data is a converted copy
    cdef object compute_dtype     # the copy's dtype, until it is made
    cdef Block b
    cdef int axis                 # the channel axis, in [0, ndim)
    # The call's output, set by output_for (_rules.pxi)
    cdef object result            # what the caller gets
    cdef object kernel            # where the kernels write
    cdef bint convert             # result is filled from kernel by finish()

    @property
    def shape(self):
        """The caller's shape."""
        return self.source.shape

    @property
    def dtype(self):
        """The dtype results come back in: the input's (float16, bfloat16 and
        byte-swapped data are computed in a native float32/float64 copy)."""
        return self.result_dtype()

    cdef inline object result_dtype(self):
        return self.data.dtype if self.converted_dtype is None else self.converted_dtype

    cdef inline Py_ssize_t size(self) noexcept:
        return self.b.outer * self.b.C * self.b.inner


cdef int axis_index(object axis, int ndim, object array) except -1:
    """The channel axis as an index in [0, ndim)."""
    cdef int overflow = 0
    cdef long ax
    if not PyLong_CheckExact(axis):
        axis = _convert.integer(axis, "axis")
    ax = PyLong_AsLongAndOverflow(axis, &overflow)
    if overflow or not -ndim <= ax < ndim:
        raise ValueError(
            f"axis {axis} is out of bounds for input of shape {array.shape} ({ndim}D)"
        )
    return <int>(ax + ndim if ax < 0 else ax)


cdef View view_of(object x, object axis, Accepts accepts, str name, View v=None):
    """``x`` checked against ``accepts`` and seen as (outer, C, inner), in
    ``v`` when given (a Record: one object per call)."""
    if v is None:
        v = View.__new__(View)
    cdef cnp.ndarray array
    cdef int ndim, k, ax
    cdef cnp.npy_intp* dims
    cdef bint plain = plain_float_array(x)
    if plain:
        array = x
    else:
        array, v.converted_dtype = _convert.input_array(x, name)
    ndim = cnp.PyArray_NDIM(array)
    if accepts.ranks_text is not None and not (accepts.min_ndim <= ndim <= accepts.max_ndim):
        raise ValueError(f"expected {accepts.ranks_text} input (got {ndim}D input)")
    if ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (batch and channels), "
            f"got shape {(<object>array).shape}"
        )
    ax = axis_index(axis, ndim, array)
    dims = cnp.PyArray_DIMS(array)
    if accepts.num_channels >= 0 and dims[ax] != accepts.num_channels:
        raise ValueError(
            f"{accepts.owner}({accepts.num_channels}) expects {accepts.num_channels} "
            f"channels on axis {axis}, got {name} of shape {(<object>array).shape} "
            f"with {dims[ax]}"
        )
    v.source = array
    if plain:
        v.data = array
        v.b.typenum = cnp.PyArray_TYPE(array)
    else:
        v.data = None
        v.compute_dtype = _convert.compute_dtype(array.dtype, name)
        v.b.typenum = cnp.NPY_FLOAT if v.compute_dtype.itemsize == 4 else cnp.NPY_DOUBLE
    v.b.outer = 1
    v.b.inner = 1
    for k in range(ax):
        v.b.outer *= dims[k]
    for k in range(ax + 1, ndim):
        v.b.inner *= dims[k]
    v.b.C = dims[ax]
    v.axis = ax
    return v


cdef object kernel_data(View v):
    """The array the kernels read: the input itself, or its copy made now."""
    if v.data is None:
        v.data = _convert.kernel_layout(v.source, v.compute_dtype)
    return v.data


cdef bint same_dims(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int k
    if cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b):
        return False
    for k in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[k] != cnp.PyArray_DIMS(b)[k]:
            return False
    return True


cdef object view_like(object a, View v, str name):
    """``a`` (a gradient, an output) of ``v``'s shape, as the kernels read it
    in ``v``'s kernel dtype."""
    if (plain_float_array(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == v.b.typenum
            and same_dims(<cnp.ndarray>a, <cnp.ndarray>v.source)):
        return a
    array = _convert.input_array(a, name)[0]
    if array.shape != v.source.shape:
        raise ValueError(
            f"{name} has shape {array.shape}, expected the input's shape {v.source.shape}"
        )
    return _convert.kernel_layout(array, float32_dtype if v.b.typenum == cnp.NPY_FLOAT
                                  else float64_dtype)
