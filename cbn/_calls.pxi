# The operations: every public call of cbn ends in one of these, which check
# their arguments by the rules of _rules.pxi, run the kernels through the
# table, and update state. Each returns its results or raises before any
# state (running statistics, the caller's arrays but ``out``) has changed.


# -- the kernels for a block's dtype

cdef int forward_kernel(Block b, const void* x, void* y, const double* weight,
                        const double* bias, double eps, bint batch_stats, double* mean,
                        double* var, double* invstd, bint relu) noexcept nogil:
    cdef int threads = threads_for(b.outer * b.C * b.inner)
    if b.typenum == cnp.NPY_FLOAT:
        return K.forward_f32(<const float*>x, b.outer, b.C, b.inner, weight, bias, eps,
                             batch_stats, mean, var, invstd, <float*>y, relu, threads)
    return K.forward_f64(<const double*>x, b.outer, b.C, b.inner, weight, bias, eps,
                         batch_stats, mean, var, invstd, <double*>y, relu, threads)


cdef int normalize_kernel(Block b, const void* x, void* y, const double* mean,
                          const double* scale, const double* shift,
                          bint relu) noexcept nogil:
    cdef Py_ssize_t n = b.outer * b.C * b.inner
    cdef Py_ssize_t itemsize = sizeof(float) if b.typenum == cnp.NPY_FLOAT else sizeof(double)
    cdef bint stream = n * itemsize >= K.stream_min_bytes
    if b.typenum == cnp.NPY_FLOAT:
        return K.normalize_f32(<const float*>x, b.outer, b.C, b.inner, mean, scale, shift,
                               <float*>y, relu, stream, threads_for(n))
    return K.normalize_f64(<const double*>x, b.outer, b.C, b.inner, mean, scale, shift,
                           <double*>y, relu, stream, threads_for(n))


cdef int backward_kernel(Block b, const void* dy, const void* x, void* dx,
                         const double* mean, const double* invstd, const double* weight,
                         bint training, double* sum_dy, double* dotp) noexcept nogil:
    cdef int threads = threads_for(b.outer * b.C * b.inner)
    if b.typenum == cnp.NPY_FLOAT:
        return K.backward_f32(<const float*>dy, <const float*>x, b.outer, b.C, b.inner,
                              mean, invstd, weight, training, sum_dy, dotp, <float*>dx,
                              threads)
    return K.backward_f64(<const double*>dy, <const double*>x, b.outer, b.C, b.inner,
                          mean, invstd, weight, training, sum_dy, dotp, <double*>dx,
                          threads)


cdef void relu_grad_kernel(Block b, const void* dy, const void* y,
                           void* dz) noexcept nogil:
    cdef Py_ssize_t n = b.outer * b.C * b.inner
    if b.typenum == cnp.NPY_FLOAT:
        K.relu_grad_f32(<const float*>dy, <const float*>y, <float*>dz, n, threads_for(n))
    else:
        K.relu_grad_f64(<const double*>dy, <const double*>y, <double*>dz, n, threads_for(n))


cdef inline void* data_of(object a) noexcept:
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline double* row(object block, Py_ssize_t k, Py_ssize_t C) noexcept:
    return <double*>cnp.PyArray_DATA(<cnp.ndarray>block) + k * C


cdef object new_block(Py_ssize_t rows, Py_ssize_t C):
    """A (rows, C) float64 array for per-channel values."""
    cdef cnp.npy_intp dims[2]
    dims[0] = rows
    dims[1] = C
    return cnp.PyArray_EMPTY(2, dims, cnp.NPY_DOUBLE, 0)


cdef object channels_as(const double* values, Py_ssize_t C, object dtype):
    """A new (C,) array of ``dtype`` holding ``values``."""
    cdef cnp.npy_intp n = C
    a = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT if dtype is float32_dtype else cnp.NPY_DOUBLE,
                          0)
    store_channels(a, values, C)
    if dtype is float32_dtype or dtype is float64_dtype:
        return a
    return a.astype(dtype)   # float16, bfloat16, other byte orders


# -- what a backward needs

# Rows of a forward's per-channel block
cdef enum:
    R_MEAN, R_VAR, R_INVSTD, R_WEIGHT, R_BIAS, R_RUNNING_MEAN, R_RUNNING_VAR, R_ROWS


@cython.freelist(4)
cdef class Record(View):
    """One forward, as its backward needs it: replaced whole by each forward.

    ``output``: what it returned. ``batch_stats``: it normalized with the
    batch's own statistics (which then depend on the input). ``mean``,
    ``invstd``, ``weight``: the float64 per-channel values it used. The input
    is kept (the caller's array, or the kernels' copy of it: a Record is the
    View of its forward's input) unless ``out=`` was written over it
    (``overwritten``), and so is the output when a ReLU was fused (backward
    masks with it)."""

    cdef readonly object output
    cdef readonly bint batch_stats
    cdef readonly bint overwritten   # then the input (this view) must not be read
    cdef object relu_output
    cdef object stats       # (R_ROWS, C) block, or the ChannelParams used
    cdef const double* mean_p
    cdef const double* invstd_p
    cdef const double* weight_p

    cdef Py_ssize_t num_channels

    # Copies, as float64 (C,) arrays
    @property
    def mean(self):
        return channels_as(self.mean_p, self.num_channels, float64_dtype)

    @property
    def invstd(self):
        return channels_as(self.invstd_p, self.num_channels, float64_dtype)

    @property
    def weight(self):
        return channels_as(self.weight_p, self.num_channels, float64_dtype)


cdef Record finish_record(Record r, object out, bint relu):
    """``r`` once its forward has run: its output finished."""
    r.output = finish(r)
    r.overwritten = out is not None and shares_memory(out, r.source)
    r.relu_output = r.output if relu else None
    r.num_channels = r.b.C
    return r


# -- statistics

def stats(x, axis, out):
    """cbn.batch_stats: (mean, biased var) in x's dtype, or written to ``out``."""
    cdef View v = view_of(x, axis, ANY_INPUT, "input")
    cdef Py_ssize_t C = v.b.C
    cdef int status = 0
    if out is not None:
        out = stats_out(out, v)
    block = new_block(2, C)
    cdef double* mean = row(block, 0, C)
    cdef double* var = row(block, 1, C)
    cdef const void* xp = data_of(kernel_data(v))
    cdef int threads = threads_for(v.size())
    if v.b.outer * v.b.inner == 0:
        block.fill(numpy.nan)
    elif C:
        with nogil:
            if v.b.typenum == cnp.NPY_FLOAT:
                status = K.batch_stats_f32(<const float*>xp, v.b.outer, C, v.b.inner, mean,
                                           var, threads)
            else:
                status = K.batch_stats_f64(<const double*>xp, v.b.outer, C, v.b.inner, mean,
                                           var, threads)
        check_scratch(status)
    if out is None:
        return block[0].astype(v.result_dtype()), block[1].astype(v.result_dtype())
    out[0][...] = block[0]
    out[1][...] = block[1]
    return out


cdef tuple stats_out(object out, View v):
    """``out`` of batch_stats: a pair of separate writable (C,) arrays of the
    input's dtype."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(
            "out must be a pair (mean, var) of arrays, got "
            f"{type(out).__name__}"
            f"{'' if not isinstance(out, (tuple, list)) else f' of {len(out)}'}"
        )
    for name, array in zip(("out[0] (mean)", "out[1] (var)"), out):
        if not isinstance(array, numpy.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(array).__name__}")
        if array.shape != (v.b.C,):
            raise ValueError(f"{name} has shape {array.shape}, expected "
                             f"({v.b.C},) for {v.b.C} channels")
        if array.dtype != v.dtype:
            raise TypeError(f"{name} has dtype {array.dtype}, expected the input's dtype "
                            f"{v.dtype}")
        if not array.flags.writeable:
            raise ValueError(f"{name} is read-only")
    if numpy.may_share_memory(out[0], out[1]):
        raise ValueError("out[0] (mean) and out[1] (var) must be separate arrays")
    return tuple(out)


# -- forwards

cdef enum:
    # What a forward does with batch statistics that are not finite
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
    """PyTorch's update, in place: running = (1 - factor) * running + factor *
    batch, with the unbiased batch variance (n / (n - 1)); with
    skip_nonfinite, channels whose statistics are not finite keep theirs."""
    cdef Py_ssize_t c
    cdef double correction = <double>n / (n - 1)
    for c in range(C):
        if skip_nonfinite and not finite_stats(mean, var, c):
            continue
        running_mean[c] = (1.0 - factor) * running_mean[c] + factor * mean[c]
        running_var[c] = (1.0 - factor) * running_var[c] + factor * (var[c] * correction)


cdef int check_running_pair(object running_mean, object running_var) except -1:
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must be given together (or both None), "
            f"got running_mean={'None' if running_mean is None else 'an array'} and "
            f"running_var={'None' if running_var is None else 'an array'}"
        )
    return 0


def forward_stats(x, axis, weight, bias, eps, out):
    """cbn.batch_norm_forward: (y, save_mean, save_invstd), the statistics
    as new float64 arrays."""
    cdef Record r = train_forward(x, axis, ANY_INPUT, weight, bias, eps, None, None, None,
                                  None, False, NONFINITE_PROPAGATE, out)
    return (r.output, channels_as(r.mean_p, r.num_channels, float64_dtype),
            channels_as(r.invstd_p, r.num_channels, float64_dtype))


cpdef Record train_forward(x, axis, Accepts accepts, weight, bias, eps, running_mean,
                           running_var, momentum, batches_tracked, bint relu, int nonfinite,
                           out, bint may_overwrite_input=False):
    """A forward with the batch's statistics (training, or eval without
    running statistics): returns its Record. With running statistics, they
    are updated in place with ``momentum``, or with the cumulative average
    over ``batches_tracked`` earlier batches when momentum is None (layers
    only: functions pass batches_tracked=None). ``out`` may be the input only
    where no backward is expected (``may_overwrite_input``: eval mode)."""
    cdef Record r = Record.__new__(Record)
    cdef View v = view_of(x, axis, accepts, "input", r)
    cdef Py_ssize_t C = v.b.C, n = v.b.outer * v.b.inner
    cdef double eps_c = eps_value(eps)
    cdef double factor = 0.0
    cdef bint update = running_mean is not None
    cdef int status = 0
    check_running_pair(running_mean, running_var)
    momentum = check_momentum(momentum, allow_none=batches_tracked is not None or not update)
    if update:
        factor = 1.0 / (batches_tracked + 1) if momentum is None else momentum
    if not may_overwrite_input:
        check_not_over_input(out, v)
    block = new_block(R_ROWS, C)
    read_channels(weight, C, row(block, R_WEIGHT, C), "weight", 1.0, True)
    read_channels(bias, C, row(block, R_BIAS, C), "bias", 0.0, True)
    if update:
        running_buffer(running_mean, C, "running_mean")
        running_buffer(running_var, C, "running_var")
    if n == 1:  # PyTorch's rule: one value per channel has no variance
        raise ValueError(
            "Expected more than 1 value per channel when training, "
            f"got input size {v.source.shape}"
        )
    output_for(v, out, (running_mean, running_var) if update else ())
    cdef const void* xp = data_of(v.data)
    cdef void* yp = data_of(v.kernel)
    cdef double* s = row(block, 0, C)
    if n == 0 or C == 0:  # an empty batch: no statistics, nothing to update
        block[R_MEAN:R_INVSTD + 1] = numpy.nan
        update = False
    else:
        with nogil:
            status = forward_kernel(v.b, xp, yp, s + R_WEIGHT * C, s + R_BIAS * C, eps_c,
                                    True, s + R_MEAN * C, s + R_VAR * C,
                                    s + R_INVSTD * C, relu)
        check_scratch(status)
        if nonfinite == NONFINITE_RAISE:
            bad = [c for c in range(C) if not finite_stats(s + R_MEAN * C, s + R_VAR * C, c)]
            if bad:
                raise nonfinite_error(bad)
    if update:
        read_channels(running_mean, C, s + R_RUNNING_MEAN * C, "running_mean")
        read_channels(running_var, C, s + R_RUNNING_VAR * C, "running_var")
        running_update(s + R_RUNNING_MEAN * C, s + R_RUNNING_VAR * C, s + R_MEAN * C,
                       s + R_VAR * C, C, n, factor, nonfinite == NONFINITE_SKIP)
        store_into(running_mean, s + R_RUNNING_MEAN * C, C)
        store_into(running_var, s + R_RUNNING_VAR * C, C)
    finish_record(r, out, relu)
    r.batch_stats = True
    r.stats = block
    r.mean_p = s + R_MEAN * C
    r.invstd_p = s + R_INVSTD * C
    r.weight_p = s + R_WEIGHT * C
    return r


def eval_forward(x, axis, weight, bias, running_mean, running_var, eps, momentum,
                 bint relu, out):
    """cbn.batch_norm with training=False: normalize with given statistics."""
    cdef View v = view_of(x, axis, ANY_INPUT, "input")
    cdef Py_ssize_t C = v.b.C
    cdef double eps_c = eps_value(eps)
    cdef int status = 0
    check_running_pair(running_mean, running_var)
    check_momentum(momentum)
    if running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    # malloc rather than an array: nothing outlives the call, and small calls
    # feel every allocation
    cdef double* s = <double*>malloc(R_ROWS * C * sizeof(double) + 1)
    if s == NULL:
        raise MemoryError()
    try:
        read_channels(weight, C, s + R_WEIGHT * C, "weight", 1.0, True)
        read_channels(bias, C, s + R_BIAS * C, "bias", 0.0, True)
        read_channels(running_mean, C, s + R_MEAN * C, "running_mean")
        read_channels(running_var, C, s + R_VAR * C, "running_var")
        output_for(v, out, ())
        xp = data_of(v.data)
        yp = data_of(v.kernel)
        if v.size():
            with nogil:
                status = forward_kernel(v.b, xp, yp, s + R_WEIGHT * C, s + R_BIAS * C,
                                        eps_c, False, s + R_MEAN * C, s + R_VAR * C,
                                        s + R_INVSTD * C, relu)
            check_scratch(status)
        return finish(v)
    finally:
        free(s)


def normalize(x, axis, Accepts accepts, ChannelParams params not None, bint relu, out,
              str name="input", relu_mask=None):
    """An inference call with ready parameters (a layer's eval, a frozen
    layer); returns its Record. ``relu_mask``: an earlier output whose
    clipped places (<= 0) zero ``x`` first (a frozen layer's backward)."""
    cdef Record r = Record.__new__(Record)
    cdef View v = view_of(x, axis, accepts, name, r)
    cdef int status = 0
    cdef const void* mp = NULL
    if relu_mask is not None:
        if relu_mask.shape != v.source.shape:
            raise ValueError(
                f"{name} has shape {v.source.shape}, expected the output's shape "
                f"{relu_mask.shape}"
            )
        relu_mask = view_like(relu_mask, v, "output")
        mp = data_of(relu_mask)
    output_for(v, out, (relu_mask,))
    cdef const void* xp = data_of(v.data)
    cdef void* yp = data_of(v.kernel)
    if v.size():
        with nogil:
            if mp != NULL:  # masked in the output, then scaled there in place
                relu_grad_kernel(v.b, xp, mp, yp)
                xp = yp
            status = normalize_kernel(v.b, xp, yp, params.mean_p, params.scale_p,
                                      params.bias_p, relu)
        check_scratch(status)
    finish_record(r, out, relu)
    r.batch_stats = False
    r.stats = params
    r.mean_p = params.mean_p
    r.invstd_p = params.invstd_p
    r.weight_p = params.weight_p
    return r


# -- backwards

cdef View output_view(View v):
    """A View of ``v``'s input for another call's output: a forward's record
    keeps its own output fields, whatever its backwards do."""
    cdef View o = View.__new__(View)
    o.data, o.source, o.b = v.data, v.source, v.b
    o.converted_dtype, o.compute_dtype = v.converted_dtype, v.compute_dtype
    return o


cdef tuple run_backward(View v, object dy, object dy_data, const double* mean,
                        const double* invstd, const double* weight, bint training,
                        object out, object relu_output, object grad_dtype,
                        bint own_view):
    """(dx, grad_weight, grad_bias) of a forward on ``v`` that normalized with
    ``mean`` and ``invstd``; ``relu_output``: its output when a ReLU was
    fused (its clipped places pass no gradient). ``own_view``: ``v`` is this
    call's own, and takes the output (else it is a record, which keeps its
    forward's)."""
    cdef Py_ssize_t c, C = v.b.C
    cdef int status = 0
    y_data = None if relu_output is None else view_like(relu_output, v, "output")
    cdef View o = v if own_view else output_view(v)
    output_for(o, out, (dy if cnp.PyArray_Check(dy) else None, dy_data, y_data))
    cdef const void* dyp = data_of(dy_data)
    cdef const void* xp = data_of(o.data)
    cdef const void* yp = NULL
    cdef void* dxp = data_of(o.kernel)
    cdef void* masked = dxp
    # sum of dy, sum of (x - mean) * dy, grad_weight
    cdef double* sp = <double*>calloc(3 * C + 1, sizeof(double))
    if sp == NULL:
        raise MemoryError()
    try:
        if o.size():  # an empty batch: nothing flows back (the sums stay 0)
            if y_data is not None:
                # The masked gradient goes where dx will, unless dx is x or the
                # output (both still to be read): then aside.
                if shares_memory(o.kernel, o.data) or shares_memory(o.kernel, y_data):
                    aside = numpy.empty_like(o.kernel)
                    masked = data_of(aside)
                yp = data_of(y_data)
            with nogil:
                if yp != NULL:
                    relu_grad_kernel(o.b, dyp, yp, masked)
                    dyp = masked
                status = backward_kernel(o.b, dyp, xp, dxp, mean, invstd, weight, training,
                                         sp, sp + C)
                for c in range(C):
                    sp[2 * C + c] = sp[C + c] * invstd[c]
            check_scratch(status)
        return finish(o), channels_as(sp + 2 * C, C, grad_dtype), channels_as(sp, C, grad_dtype)
    finally:
        free(sp)


def record_backward(Record record, dy, out, grad_dtype, str owner):
    """A layer's backward of the forward ``record`` describes."""
    if record.overwritten:
        raise ValueError(
            f"{owner}.backward: the last forward wrote its output over its input "
            "(out=x), and backward needs the input"
        )
    return run_backward(record, dy, view_like(dy, record, "dy"), record.mean_p,
                        record.invstd_p, record.weight_p, record.batch_stats, out,
                        record.relu_output, grad_dtype, False)


def backward(dy, x, axis, save_mean, save_invstd, weight, training, out):
    """cbn.batch_norm_backward."""
    cdef View v = view_of(x, axis, ANY_INPUT, "x")
    cdef Py_ssize_t C = v.b.C
    cdef double* s = <double*>malloc(3 * C * sizeof(double) + 1)
    if s == NULL:
        raise MemoryError()
    try:
        read_channels(save_mean, C, s, "save_mean")
        read_channels(save_invstd, C, s + C, "save_invstd")
        read_channels(weight, C, s + 2 * C, "weight", 1.0, True)
        training_c = check_training_flag(training)
        dy_data = view_like(dy, v, "dy")  # last: it may copy a huge dy
        return run_backward(v, dy, dy_data, s, s + C, s + 2 * C, training_c, out, None,
                            v.result_dtype(), True)
    finally:
        free(s)
